"""User-code rewards for the tests, loaded through the `module:function` path of the registry."""


def sevens(completions, **_):
    """A learnable toy for a random policy: the share of characters that are '7'."""
    return [c.count("7") / max(len(c), 1) for c in completions]


def wrong_length(completions, **_):
    return [1.0]


def text_length(completions, **_):
    """Always varies within a group, so every step has a non-zero advantage."""
    return [len(c) / 100 for c in completions]


def slow_text_length(completions, **_):
    """text_length, 0.3 s late: a run slow enough that a signal sent between steps lands mid-run."""
    import time

    time.sleep(0.3)
    return text_length(completions)
