"""Sessions of moe-compat. Run them from the base environment: ``./bootstrap.sh && .venv/bin/nox -s <session>``.

Every session uses ``venv_backend="none"``: the harness builds its own venvs (``harness/envs.py``) so that each
shares the base interpreter's torch through a .pth file and never installs one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

nox.options.default_venv_backend = "none"
nox.options.sessions = ["tests"]


def _requirements(path: Path) -> list[str]:
    lines = (ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines())
    return [ln for ln in lines if ln]


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """The test suite against the newest upstream releases (requirements/tests.txt). CI runs this."""
    from harness.envs import ensure_env

    session.log("building/reusing the tests venv (.envs/tests), sharing the base torch")
    env = ensure_env("tests", _requirements(ROOT / "requirements" / "tests.txt"))
    args = session.posargs or ["tests"]
    session.run(str(env.python), "-m", "pytest", "-p", "no:cacheprovider", "-p", "harness.pytest_plugin", *args,
                external=True,
                env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
