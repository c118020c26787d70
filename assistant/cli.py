"""rkvlm-assistant: run / ask / check / devices / models / bench / demo.

Exit codes: 0 done, 1 a failure during work, 2 bad command line, 65 bad input file,
69 a device or service is unavailable, 70 a runtime (NPU, llama.cpp) failed, 78 the
configuration is wrong (systemd does not restart on 78).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Optional

from assistant import __version__, paths
from assistant.config import EX_CONFIG, Config, ConfigError, load
from assistant.errors import AssistantError

log = logging.getLogger("assistant")

# Commands that act on the installed service's files when root runs them (assistant.paths).
SERVICE_COMMANDS = ("models", "history", "check", "doctor")


def find_config(arg: Optional[str], layout: paths.Layout = paths.Layout(service=False)) -> Config:
    """--config, else $RKVLM_CONFIG, else the layout's search: ./config.yaml,
    $XDG_CONFIG_HOME/rkvlm-assistant/config.yaml, /etc/rkvlm-assistant/config.yaml for a
    person; only the system config for root on an installed machine (a checkout's own
    ./config.yaml is not what the service reads)."""
    if arg or os.environ.get("RKVLM_CONFIG"):
        return load(arg or os.environ["RKVLM_CONFIG"])
    for p in layout.config_search():
        # exists, not is_file: a FIFO or a directory there is refused by load (exit 78),
        # not passed over for the built-in defaults.
        if p.exists() and os.access(p, os.R_OK):
            return load(p)
    return Config()


def setup_logging(level: str) -> None:
    # Under systemd (INVOCATION_ID set) journald stamps the time itself.
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("INVOCATION_ID"):
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=getattr(logging, level), format=fmt, stream=sys.stderr, force=True)
    # faster-whisper logs every utterance's duration at INFO; our ASR line says more.
    logging.getLogger("faster_whisper").setLevel(max(logging.WARNING, getattr(logging, level)))


# ---------------------------------------------------------------------------- commands

def cmd_run(args, cfg: Config) -> int:
    import dataclasses

    from assistant.daemon import run_daemon

    if args.debug_recording:
        cfg = dataclasses.replace(cfg, logging=dataclasses.replace(
            cfg.logging, debug_recording=str(Path(args.debug_recording).resolve())))
    return asyncio.run(run_daemon(cfg))


def cmd_serve(args, cfg: Config) -> int:
    from assistant.serve import run_serve

    return asyncio.run(run_serve(cfg))


def cmd_ask(args, cfg: Config) -> int:
    from assistant.ask import ask

    result = asyncio.run(ask(cfg, Path(args.audio), Path(args.image) if args.image else None,
                             Path(args.out) if args.out else None, realtime=args.realtime))
    print(json.dumps(result, ensure_ascii=False, indent=None if args.compact else 2))
    return 0


def cmd_check(args, cfg: Config) -> int:
    from assistant.check import run_check

    # Root on an installed machine, or --root: as the service runs (its wake mode, its unit).
    return run_check(cfg, service=args.layout.service, root=args.layout.root)


def cmd_devices(args, cfg: Config) -> int:
    from assistant.check import print_devices

    return print_devices()


def cmd_models(args, cfg: Config) -> int:
    from assistant import models_cli
    from assistant.llm import catalog

    models_dir = catalog.models_dir_for(cfg.llm.llamacpp, cfg.path)
    config_path = Path(args.config) if args.config else None
    if args.models_cmd == "pull":
        return models_cli.cli_pull(cfg, args.name, models_dir, configure=args.configure,
                                   config_path=config_path, layout=args.layout)
    if args.models_cmd == "use":
        return models_cli.cli_use(cfg, args.name, models_dir, config_path, layout=args.layout)
    return models_cli.cli_list(cfg, models_dir)


def cmd_doctor(args, cfg: Config) -> int:
    from assistant.doctor import run_doctor

    return run_doctor(cfg, Path(args.root or "/"))


def cmd_bench(args, cfg: Config) -> int:
    from assistant.bench import run_bench

    return run_bench(cfg, args)


def _bench_profile(name: str) -> str:
    """--profile: a known bench profile (checked when bench is parsed)."""
    from assistant.bench_profiles import profile_names

    if name not in profile_names():
        raise argparse.ArgumentTypeError(
            f"unknown profile {name!r}; choose one of: {', '.join(profile_names())}")
    return name


def cmd_install(args, cfg: Config) -> int:
    from assistant.install import cli_install

    return cli_install(args)


def cmd_uninstall(args, cfg: Config) -> int:
    from assistant.install import cli_uninstall

    return cli_uninstall(args)


def cmd_history(args, cfg: Config) -> int:
    from assistant.transcript import cli_history

    return cli_history(cfg, args.n, args.json, args.conversation)


def cmd_demo(args, cfg: Config) -> int:
    from assistant.demo import run_demo

    return run_demo(cfg, Path(args.out_dir))


def _service_root(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", metavar="DIR",
                        help="act on the installation in this directory tree (its "
                             "etc/rkvlm-assistant/config.yaml and the service's directories)")


def _layout(args) -> paths.Layout:
    """The service's files for root on an installed machine, or under --root (see
    assistant.paths); a person's otherwise. run/serve/ask always use their own environment."""
    if args.cmd not in SERVICE_COMMANDS:
        return paths.Layout(service=False)
    root = getattr(args, "root", None)
    if args.cmd == "doctor" and root and not paths.system_config(Path(root)).is_file():
        return paths.Layout(service=False)   # a copy of a board's /proc and /sys alone
    return paths.choose(root)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rkvlm-assistant",
                                description="Offline voice-and-vision assistant for RK3576 / RK3588 boards.")
    p.add_argument("--version", action="version", version=f"rkvlm-assistant {__version__}")
    p.add_argument("--config", "-c", help="config file (default: $RKVLM_CONFIG, ./config.yaml, "
                                          "/etc/rkvlm-assistant/config.yaml)")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="override logging.level")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("run", help="the daemon: listen on the microphone, answer on the speaker")
    s.add_argument("--debug-recording", metavar="DIR",
                   help="keep each utterance (WAV) and the snapshot its turn used (JPEG) in DIR, "
                        "bounded by logging.debug_recording_max_files / _max_mb (overrides "
                        "logging.debug_recording)")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("serve", help="the HTTP API and web page alone (no microphone or speaker)")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("ask", help="one turn from a WAV file (and an image); prints JSON")
    s.add_argument("--audio", required=True, help="the spoken question, a WAV file")
    s.add_argument("--image", help="what the camera sees, an image file")
    s.add_argument("--out", help="write the spoken answer to this WAV file")
    s.add_argument("--realtime", action="store_true", help="feed the audio at real-time pace, like a microphone")
    s.add_argument("--compact", action="store_true", help="print the JSON on one line")
    s.set_defaults(func=cmd_ask)

    s = sub.add_parser("check", help="validate the config; report every missing model and device")
    _service_root(s)
    s.set_defaults(func=cmd_check)

    s = sub.add_parser("devices", help="list microphones, speakers and cameras")
    s.set_defaults(func=cmd_devices)

    s = sub.add_parser("models", help="language and speech models: list, download, select")
    msub = s.add_subparsers(dest="models_cmd", required=True, metavar="ACTION")
    _service_root(msub.add_parser("list", help="every model, and which are installed where"))
    m = msub.add_parser("pull", help="download a model through the hub cache (resumes, verifies)")
    m.add_argument("name")
    m.add_argument("--configure", action="store_true",
                   help="then write the keys that select it into the config file")
    _service_root(m)
    m = msub.add_parser("use", help="write the keys that select a model (catalogue, whisper size, piper voice) into the config file")
    m.add_argument("name")
    _service_root(m)
    s.set_defaults(func=cmd_models)

    s = sub.add_parser("doctor", help="check the board (SoC, memory, NPU driver, runtimes) and recommend a model")
    s.add_argument("--root", metavar="DIR", help="read /proc, /sys and libraries under this "
                   "directory (and the installation's config there, if it has one)")
    s.set_defaults(func=cmd_doctor)

    s = sub.add_parser("bench", help="what the person waits for, from the last word to the first "
                                      "sound: measured here, or planned for a board")
    s.add_argument("--rounds", type=int, default=None,
                   help="rounds of each scenario, pipelined and serial (default 3)")
    s.add_argument("--turns", type=int, default=None, help="the same as --rounds (older name)")
    s.add_argument("--profile", type=_bench_profile, default="measured", metavar="PROFILE",
                   help="measured: this machine's real stages; CHIP-MODEL (rk3576-qwen2-vl-2b, "
                        "rk3588-qwen2.5-vl-3b, rk3576-smolvlm-256m, ...; rk3576 and rk3588 "
                        "are Qwen2-VL-2B): the NPU stages replayed from published figures, "
                        "whisper and piper slowed to the board's speed")
    s.add_argument("--scenario", choices=["all", "same_scene", "new_scene", "idle_encoded",
                                          "long_conversation"],
                   default="all", help="which scenario to run (default all)")
    s.add_argument("--questions", type=int, default=None,
                   help="questions of long_conversation (default 60)")
    s.add_argument("--json", action="store_true", help="print the figures as JSON")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("history", help="the recent turns from the transcript")
    s.add_argument("-n", type=int, default=20, help="how many turns (default 20; 0: all)")
    s.add_argument("--json", action="store_true", help="one JSON object per line")
    s.add_argument("--conversation", help="only the turns of this conversation id")
    _service_root(s)
    s.set_defaults(func=cmd_history)

    s = sub.add_parser("demo", help="speak a sample question about a sample image through the whole loop")
    s.add_argument("--out-dir", default="out", help="where the sample files and the answer go")
    s.set_defaults(func=cmd_demo)

    for name, func, what in (("install", cmd_install, "install and start the systemd service "
                              "(user, unit, /etc/rkvlm-assistant/config.yaml, state dirs)"),
                             ("uninstall", cmd_uninstall, "stop and remove the service; keep the "
                              "config, the transcript and the state")):
        s = sub.add_parser(name, help=what)
        s.add_argument("--root", metavar="DIR", help="act on a directory tree instead of /")
        s.add_argument("--dry-run", action="store_true", help="print each action, change nothing")
        if name == "install":
            s.add_argument("--no-check", action="store_true", help="skip `check` of the installed config")
            s.add_argument("--no-models", action="store_true",
                           help="skip `models pull` of the config's speech models")
            s.add_argument("--fix-permissions", action="store_true",
                           help="make a config holding a secret (http.api_key) 0640 root:rkvlm")
        s.set_defaults(func=func)
    # --config after the command too (`rkvlm-assistant run --config FILE`, as the unit says).
    parsers = list(sub.choices.values()) + list(msub.choices.values())
    for s in parsers:
        s.add_argument("--config", "-c", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.layout = _layout(args)
        saved = paths.enter(args.layout)   # ValueError: no installation, or a link out of --root
    except ValueError as e:
        print(f"rkvlm-assistant {args.cmd}: {e}", file=sys.stderr)
        return EX_CONFIG
    try:
        return _main(args)
    finally:
        paths.hand_over(args.layout)
        paths.leave(saved)


def _main(args) -> int:
    try:
        cfg = find_config(args.config, args.layout)
        if args.layout.service:
            cfg = paths.in_tree(cfg, args.layout.root)
    except ConfigError as e:
        setup_logging("INFO")
        print(f"rkvlm-assistant: {e}", file=sys.stderr)
        return EX_CONFIG
    setup_logging(args.log_level or cfg.logging.level)
    if args.cmd != "check":               # check lists them in its report
        for warning in cfg.warnings:      # keys of an earlier release: once, at start
            log.warning("%s", warning)
    # SIGTERM (systemctl stop) ends the process like Ctrl-C: cleanly, through the finally blocks.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        return args.func(args, cfg)
    except ConfigError as e:
        print(f"rkvlm-assistant: {e}", file=sys.stderr)
        return EX_CONFIG
    except AssistantError as e:
        print(f"rkvlm-assistant: {e}", file=sys.stderr)
        return e.exit_code
    except paths.root_paths.OutsideRoot as e:   # --root: a link out of the tree
        print(f"rkvlm-assistant {args.cmd}: {e}", file=sys.stderr)
        return EX_CONFIG
    except KeyboardInterrupt:
        return 0 if args.cmd in ("run", "serve") else 130


if __name__ == "__main__":
    sys.exit(main())
