"""Every minimal reproduction a subject check wrote is Python that runs: executed against the same loaded subject,
a ``disagree`` reproduction runs to the end and a ``crash`` one raises the exception the finding names.

Runs after test_subject_checks.py in the same process (the verdicts are cached in tests/subjects/verdict.py); with
no finding in this process (the impl subject, CI) it skips and says so.
"""

from __future__ import annotations

import re

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

from harness.subjects import registry  # noqa: E402
from tests.subjects.cases import all_cases  # noqa: E402
from tests.subjects.verdict import cached  # noqa: E402

pytestmark = pytest.mark.upstream


def _code(message: str) -> str | None:
    if "\nReproduction:\n" not in message or "(truncated" in message:
        return None
    return re.split(r"\n(Expected \(reference\)|Got|Notes)", message.split("\nReproduction:\n", 1)[1])[0]


def test_reproductions_run():
    subject = registry.load()
    ran = 0
    for case in all_cases():
        v = cached(subject, case)
        if v.status not in ("disagree", "crash"):
            continue
        code = _code(v.message)
        assert code is not None, f"{case.check_name}: finding without a complete reproduction:\n{v.message}"
        if v.status == "disagree":
            exec(compile(code, f"<{case.check_name}>", "exec"), {})
        else:
            name = re.search(r"raised (\w+):", v.message).group(1)
            with pytest.raises(Exception) as exc:
                exec(compile(code, f"<{case.check_name}>", "exec"), {})
            assert type(exc.value).__name__ == name, (case.check_name, exc.value)
        ran += 1
    if not ran:
        pytest.skip(f"{registry.current_spec()} has no finding in this process: nothing to reproduce")
