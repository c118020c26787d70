import pytest

from assistant.config import IntentConfig
from assistant.intent import Intent, IntentClassifier, normalise

C = IntentClassifier(IntentConfig())


@pytest.mark.parametrize("text, intent", [
    ("Clear.", Intent.CLEAR),
    (" clear history ", Intent.CLEAR),
    ("Start over!", Intent.CLEAR),
    ("Please clear the history.", Intent.CLEAR),
    ("清除。", Intent.CLEAR),
    ("清空历史！", Intent.CLEAR),
    ("Exit.", Intent.EXIT),
    ("Goodbye!", Intent.EXIT),
    ("Okay, goodbye.", Intent.EXIT),
    ("That's it.", Intent.EXIT),        # how whisper often hears a lone "exit"
    ("That is it.", Intent.EXIT),       # ... also spelt out
    ("That’s all!", Intent.EXIT),
    ("Is that it?", Intent.QUESTION),
    ("退出", Intent.EXIT),
    ("再见。", Intent.EXIT),
    ("再见了", Intent.EXIT),
    ("Is the sky clear?", Intent.QUESTION),
    ("Clear the table for me, what is on it?", Intent.QUESTION),
    ("Say goodbye to grandma", Intent.QUESTION),
    ("What do you see?", Intent.QUESTION),
    ("你看到了什么？", Intent.QUESTION),
    ("ok", Intent.QUESTION),
    ("", Intent.NOTHING),
    ("  ...  ", Intent.NOTHING),
    ("。！", Intent.NOTHING),
])
def test_default_phrases(text, intent):
    assert C.classify(text) is intent


def test_full_width_and_case_fold():
    assert normalise("ＣＬＥＡＲ！") == "clear"
    assert normalise("Hello,   World?") == "hello world"


def test_contractions_are_spelt_out():
    assert normalise("That's it, let's go") == normalise("That is it. Let us go!") == \
        "that is it let us go"


def test_configured_phrases_replace_defaults():
    c = IntentClassifier(IntentConfig(clear_phrases=("wipe it",), exit_phrases=("over and out",)))
    assert c.classify("Wipe it.") is Intent.CLEAR
    assert c.classify("Over and out!") is Intent.EXIT
    assert c.classify("clear") is Intent.QUESTION
