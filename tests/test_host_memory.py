"""Freed host memory stays in the process: a second large buffer is not page-faulted in again."""

import importlib.metadata
import json
import subprocess
import sys
import textwrap

import pytest

from libra_jax import cli, host_memory

# A child process allocates, fills and frees a 256 MB buffer (as XLA:CPU does with a step's temporaries),
# then counts the page faults of doing it again.
REUSE_CHILD = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    from libra_jax import host_memory
    if sys.argv[1] == "keep":
      assert host_memory.keep_freed_host_memory()
    def fill():
      buffer = np.empty(64 * 2 ** 20, np.float32)
      buffer.fill(1.0)
      del buffer
    fill()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fill()
    print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
""")


def second_buffer_faults(mode: str) -> int:
  result = subprocess.run([sys.executable, "-c", REUSE_CHILD, mode], capture_output=True, text=True, check=True)
  return json.loads(result.stdout)


@pytest.mark.skipif(not host_memory.uses_glibc(), reason="mallopt is glibc's")
def test_a_freed_buffer_is_reused_without_page_faults():
  default, kept = second_buffer_faults("default"), second_buffer_faults("keep")
  # By default the 256 MB come from a fresh mmap, faulted in page by page: 65,536 faults for 4 KB pages, at
  # least 128 for 2 MB huge pages (which numpy asks the kernel for on large arrays).
  assert default >= 100
  assert kept * 10 <= default


def test_jax_computes_on_host_follows_jax_platforms(monkeypatch):
  for platforms, on_host in (("cpu", True), ("cuda", False), ("cuda,cpu", False), ("tpu", False)):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert host_memory.jax_computes_on_host() is on_host


def test_an_installed_accelerator_plugin_means_not_on_host(monkeypatch):
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  plugin = importlib.metadata.EntryPoint("xla_cuda12", "jax_cuda12_plugin", "jax_plugins")
  monkeypatch.setattr(importlib.metadata, "entry_points",
                      lambda group=None: [plugin] if group == "jax_plugins" else [])
  assert not host_memory.jax_computes_on_host()


@pytest.mark.parametrize("platforms,kept", [("cpu", True), ("cuda", False)])
def test_every_command_keeps_freed_memory_only_on_the_cpu(monkeypatch, platforms, kept):
  calls = []
  monkeypatch.setenv("JAX_PLATFORMS", platforms)
  monkeypatch.setattr(host_memory, "keep_freed_host_memory", lambda: calls.append(True))
  with pytest.raises(SystemExit):
    cli.run(lambda argv: 0, [])
  assert bool(calls) is kept
