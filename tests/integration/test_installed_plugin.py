"""The testing kit works for a user who installed cuebx, not only in this source tree."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]

USER_TEST = textwrap.dedent(
    """
    import pytest

    import cuebx
    from cuebx import Cuebx, TaskContext
    from cuebx.testing import dead_letters, drain

    app = Cuebx()
    attempts = []


    @app.task(queue="signups", retries=["10m", "1h"])
    async def welcome(ctx: TaskContext, email: str) -> None:
        attempts.append(ctx.attempt)
        raise ConnectionError("smtp down")


    @pytest.fixture
    def anyio_backend():
        return "asyncio"


    def test_cuebx_is_the_installed_one():
        assert "site-packages" in cuebx.__file__, cuebx.__file__


    @pytest.mark.anyio
    async def test_retries_then_dead_letter(cuebx_memory, cuebx_worker):
        cuebx_memory(app)
        await cuebx_worker(app)
        await welcome.delay("ann@example.com")
        await drain(app)
        assert attempts == [0, 1, 2]
        [dead] = await dead_letters(app, "signups")
        assert dead.reason == "exhausted"
    """
)


def _run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result.stdout


# pip downloads the build backend and cuebx's dependencies: far longer than the default
# per-test timeout on a machine whose pip cache is cold.
@pytest.mark.timeout(300)
def test_the_pytest_plugin_works_in_a_fresh_virtualenv_from_the_built_wheel(
    tmp_path: Path,
) -> None:
    wheels = tmp_path / "wheels"
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", wheels, ROOT, cwd=tmp_path)
    [wheel] = wheels.glob("cuebx-*.whl")
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    _run(python, "-m", "pip", "install", "-q", wheel, "pytest", cwd=tmp_path)

    project = tmp_path / "project"
    project.mkdir()
    (project / "test_user_tasks.py").write_text(USER_TEST)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CUEBX_BROKER_URL")}
    out = _run(python, "-m", "pytest", "-q", "-p", "no:cacheprovider", cwd=project, env=env)
    assert "2 passed" in out
