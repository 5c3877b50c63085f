"""`import jaxdnn` appends its XLA:CPU flags to XLA_FLAGS, never clobbering the user's."""

import os
import subprocess
import sys

import pytest

import jaxdnn

FLAG = jaxdnn.XLA_CPU_FLAGS[0]
SHOW = "import os, jaxdnn; print(os.environ.get('XLA_FLAGS', ''))"


def _flags_after_import(env_update: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXDNN_XLA_DEFAULTS")}
    env.update(env_update)
    out = subprocess.run([sys.executable, "-c", SHOW], env=env, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


@pytest.mark.parametrize("env, want", [
    ({}, FLAG),
    ({"XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}, f"--xla_cpu_enable_fast_math=false {FLAG}"),
    ({"XLA_FLAGS": f"{FLAG}individual_dot"}, f"{FLAG}individual_dot"),  # the user's own setting
    ({"JAXDNN_XLA_DEFAULTS": "0"}, ""),
])
def test_import_appends_xla_cpu_flags(env, want):
    assert _flags_after_import(env) == want


def test_flags_are_in_effect_for_this_suite():
    assert FLAG in os.environ["XLA_FLAGS"]


def test_flags_only_for_jaxlib_releases_that_have_them(monkeypatch):
    """XLA aborts on an unknown flag: a jaxlib outside XLA_CPU_FLAGS_JAXLIB gets none."""
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv("JAXDNN_XLA_DEFAULTS", raising=False)
    monkeypatch.setattr(jaxdnn, "_cpu_backend", lambda: False)  # no "backend already started" warning
    assert jaxdnn._jaxlib_release() in jaxdnn.XLA_CPU_FLAGS_JAXLIB  # the installed one is checked
    monkeypatch.setattr(jaxdnn, "_jaxlib_release", lambda: (0, 4))
    jaxdnn._append_xla_cpu_flags()
    assert "XLA_FLAGS" not in os.environ
    monkeypatch.setattr(jaxdnn, "_jaxlib_release", lambda: (0, 10))
    jaxdnn._append_xla_cpu_flags()
    assert os.environ["XLA_FLAGS"] == FLAG
