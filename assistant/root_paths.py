"""Paths of a target system inside a directory tree (``--root DIR``), and changes to them that
never follow a link out.

Every command that takes ``--root`` (install, uninstall, models, history, check) finds the
target's files through ``resolve``: each component is looked at in turn, a symbolic link is
followed the way the target system will follow it (an absolute link names a path of the
target, so it is taken under the root, as chroot does), and a link that climbs out of the tree
(``..`` past the root) or loops is refused with ``OutsideRoot``. The result has no link left
in it, so what is then opened, made or changed is inside the tree.

Ownership and modes are changed on an open descriptor taken with ``O_NOFOLLOW``
(``set_owner_mode``): a link put where a directory or file was expected is refused, not
followed (the service user owns its directories, and could plant one for root to follow).
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path, PurePosixPath

_MAX_LINKS = 40  # what the kernel allows (ELOOP) when resolving one path


class OutsideRoot(ValueError):
    """A path of the target would leave the tree (a link out, or a loop)."""


def resolve(root: Path, target_path: str, follow_last: bool = True) -> Path:
    """``target_path`` (a path of the target system) inside the tree at ``root``, every link
    resolved within the tree; with ``follow_last`` False a link as the last component is
    kept (to remove or inspect the link itself). Components that do not exist yet are
    appended as they are. Raises OutsideRoot."""
    root = Path(os.path.realpath(root))
    todo = list(reversed(PurePosixPath("/" + str(target_path).lstrip("/")).parts[1:]))
    done: list[str] = []
    links = 0
    while todo:
        name = todo.pop()
        if name in ("", "."):
            continue
        if name == "..":
            if not done:
                raise OutsideRoot(f"{target_path} leads out of {root} ('..' past its top)")
            done.pop()
            continue
        here = root.joinpath(*done, name)
        if (todo or follow_last) and here.is_symlink():
            links += 1
            if links > _MAX_LINKS:
                raise OutsideRoot(f"{target_path} under {root}: too many links (a loop at {here})")
            link = os.readlink(here)
            if link.startswith("/"):
                done = []        # the target system's absolute path: from the tree's top
            todo.extend(reversed([p for p in PurePosixPath(link).parts if p != "/"]))
            continue
        done.append(name)
    return root.joinpath(*done)


def inside(root: Path, path: Path) -> bool:
    """Whether ``path`` (already resolved) is the tree's top or below it."""
    root = Path(os.path.realpath(root))
    return Path(path) == root or root in Path(path).parents


def _open_nofollow(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OutsideRoot(f"{path} is a symbolic link: not followed to change its owner or "
                              "mode (replace it with a directory or file)") from None
        raise


def set_owner_mode(path: Path, mode: int | None = None, uid: int = -1, gid: int = -1) -> None:
    """chmod/chown ``path`` itself, never what a link there points to (OutsideRoot for a
    link). Ownership only as root; -1 leaves it."""
    fd = _open_nofollow(path)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        if os.geteuid() == 0 and (uid >= 0 or gid >= 0):
            os.fchown(fd, uid, gid)
    finally:
        os.close(fd)


def lstat_dir(path: Path) -> os.stat_result | None:
    """The directory's own status, None when it is missing or not a directory (a link is not
    one)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st if stat.S_ISDIR(st.st_mode) else None


def write_atomic(path: Path, text: str, mode: int, uid: int = -1, gid: int = -1) -> None:
    """Write ``path`` by a new file renamed over it: a link at ``path`` is replaced, not
    followed, and the temporary name cannot be a planted link (O_EXCL). Ownership only as
    root; -1 leaves it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            os.fchmod(f.fileno(), mode)
            if os.geteuid() == 0 and (uid >= 0 or gid >= 0):
                os.fchown(f.fileno(), uid, gid)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
