"""Subject checks: every case of tests/subjects/cases.py against the subject of this process.

The subject is ``$MOE_COMPAT_SUBJECT`` (``unsloth_zoo==2026.10.9``; default ``impl``, this checkout's own
implementation, which is what CI runs). Each case is one check named ``finding_subject_<op>_<case>``; its status:

- ``pass``: the subject agrees with the reference (metric ``max_abs_diff``), or refused loudly (metric ``refused``);
- ``finding``: the subject disagrees (or crashes); the message holds a minimal reproduction. For a strict subject
  (impl) this is a failure instead;
- ``xfail``: a known dependency bug explains the disagreement (dependency_bugs.py, with the link);
- ``fail``: moe-compat's reference disagrees with the real upstream on this input (our bug);
- ``skip``: the subject does not implement the operation (the reason says why).
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

from harness.subjects import registry  # noqa: E402
from tests.subjects.cases import all_cases  # noqa: E402
from tests.subjects.verdict import run_case  # noqa: E402

pytestmark = [pytest.mark.check, pytest.mark.upstream]

CASES = all_cases()


@pytest.fixture(scope="module")
def subject():
    return registry.load()


@pytest.mark.parametrize("case", CASES, ids=[f"{c.op.value}-{c.name}" for c in CASES])
def test_subject(case, subject, moe_check, record_property):
    moe_check.set(name=case.check_name, variant=case.dims or None)
    record_property("subject", f"{subject.name}=={subject.version}")
    v = run_case(subject, case)
    for k, val in v.metrics.items():
        moe_check.metric(k, val)
    if v.status == "skip":
        pytest.skip(v.message)
    if v.status == "reference_bug":
        pytest.fail(f"REFERENCE BUG (moe-compat): {v.message}")
    if v.status == "dependency":
        pytest.xfail(v.message)
    if v.status in ("disagree", "crash"):
        if subject.strict:
            pytest.fail(v.message)
        moe_check.finding(v.message)
        return
    if v.status == "refused":
        moe_check.note(v.message)
    elif v.message:
        moe_check.note(v.message)
