"""SentenceSplitter: streamed LLM text -> sentences to speak, as early as possible."""

from __future__ import annotations

import pytest

from assistant.audio.sentences import SentenceSplitter, clean_for_speech, speech_length


def split(pieces: list[str], **kw) -> tuple[list[list[str]], list[str]]:
    """(sentences returned by each feed, sentences returned by flush)."""
    s = SentenceSplitter(**kw)
    fed = [s.feed(p) for p in pieces]
    return fed, s.flush()


def flat(pieces: list[str], **kw) -> list[str]:
    fed, rest = split(pieces, **kw)
    return [x for f in fed for x in f] + rest


def test_sentences_come_out_as_soon_as_they_end():
    fed, rest = split(["Hel", "lo there", ". How a", "re you? I am fi", "ne!"])
    assert fed == [[], [], ["Hello there."], ["How are you?"], []]
    assert rest == ["I am fine!"]


def test_question_mark_at_the_end_of_a_piece_waits_for_what_follows():
    s = SentenceSplitter()
    assert s.feed("What do you see?") == []  # could still be "?!" or '?"'
    assert s.feed(" Tell me.") == ["What do you see?"]
    assert s.flush() == ["Tell me."]


def test_decimals_are_not_sentence_ends():
    assert flat(["It costs 3", ".", "5 dollars. That is ch", "eap."]) == [
        "It costs 3.5 dollars.", "That is cheap."]


def test_a_number_can_end_a_sentence():
    assert flat(["The answer is 42", ". Next question."]) == [
        "The answer is 42.", "Next question."]


@pytest.mark.parametrize("text", [
    "Mr. Smith and Dr. Jones agree.",
    "Bring fruit, e.g. apples or pears.",
    "We met at 5 p.m. yesterday.",
    "J. R. R. Tolkien wrote it.",
    "Use approx. two cups.",
    "It was cheap, etc. and so on.",
])
def test_abbreviations_and_initials_do_not_split(text):
    assert flat([text[i:i + 3] for i in range(0, len(text), 3)]) == [text]


def test_chinese_sentence_ends_split_without_spaces():
    fed, rest = split(["你好。今天", "天气很好！你呢？我很", "好；谢谢……再见"])
    assert fed == [["你好。"], ["今天天气很好！", "你呢？"], ["我很好；", "谢谢……"]]
    assert rest == ["再见"]


def test_mixed_english_then_chinese():
    assert flat(["OK.好的。"]) == ["OK.", "好的。"]


def test_newlines_end_list_items_and_list_numbers_do_not():
    text = "Here are two things:\n1. Apples are red.\n2. Pears\n- a bullet\n"
    assert flat([text[i:i + 4] for i in range(0, len(text), 4)]) == [
        "Here are two things:", "1. Apples are red.", "2. Pears", "a bullet"]


def test_markdown_is_not_read_aloud():
    assert flat(["## **Bold** claim: `code` and [a link](http://x.org/a.b) 😀 done."]) == [
        "Bold claim: code and a link done."]


def test_closing_quotes_stay_with_their_sentence():
    assert flat(['He said "hi." Then he left.']) == ['He said "hi."', "Then he left."]


def test_english_run_on_is_cut_at_a_comma_before_the_limit():
    text = ("This answer keeps going for quite a while, listing one thing, then another "
            "thing, then yet another thing that nobody asked about, and it never stops")
    fed, rest = split([text[i:i + 5] for i in range(0, len(text), 5)], max_chars=60)
    released = [x for f in fed for x in f]
    assert released, "a run-on longer than max_chars must be released before the end"
    assert all(x.endswith(",") and len(x) <= 60 for x in released)
    assert " ".join(released + rest) == text


def test_chinese_run_on_counts_characters_as_longer():
    text = "这是一个很长的句子，没有句号，一直在继续说下去，说了很多很多的话，还在说，继续说"
    sentences = flat(list(text), max_chars=60)
    assert len(sentences) > 1
    assert "".join(sentences) == text
    assert all(speech_length(s) <= 60 for s in sentences[:-1])


def test_run_on_without_commas_is_cut_at_a_space_when_twice_too_long():
    words = " ".join(["word"] * 40)  # 199 characters, no punctuation
    fed, rest = split([words], max_chars=50)
    released = [x for f in fed for x in f]
    assert released and all(not x.endswith(" wor") for x in released)
    assert " ".join(released + rest) == words


def test_thousands_separator_is_not_a_cut():
    text = "The population is about 1,000,000 people, spread over many many small villages"
    sentences = flat([text], max_chars=40)
    assert all("1,000,000" in s or "000" not in s for s in sentences)
    assert " ".join(sentences) == text


def test_flush_returns_the_rest_and_resets():
    s = SentenceSplitter()
    assert s.feed("No end here") == []
    assert s.flush() == ["No end here"]
    assert s.flush() == []
    assert s.feed("Fresh start. ") == []  # waits: the next word decides
    assert s.flush() == ["Fresh start."]


def test_reset_drops_a_partial_sentence():
    s = SentenceSplitter()
    s.feed("An answer that was interrup")
    s.reset()
    assert s.feed("New. ") == [] and s.flush() == ["New."]


@pytest.mark.parametrize("text", ["", "   ", "**", "---", "...", "😀", "\n\n"])
def test_nothing_speakable_gives_no_sentence(text):
    assert flat([text]) == []
    assert clean_for_speech(text) == ""
