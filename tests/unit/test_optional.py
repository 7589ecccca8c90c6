"""deca_ds.optional: bitsandbytes and peft are imported without bitsandbytes' import-time Hub kernel lookup.

Each case runs in a fresh interpreter (an import happens once per process). bitsandbytes asks ``kernels.get_kernel``
for its 4-bit CPU kernel only on a CPU with AVX512-BF16, so the child forces that branch (``has_avx512bf16`` patched
to True as soon as ``bitsandbytes.functional`` has executed, before the CPU backend reads it) and replaces
``kernels.get_kernel`` with a recorder: a plain import calls the recorder on any CPU (checked: the control case), the
imports of deca_ds.optional must not, must not log bitsandbytes' warning about that kernel, and must leave
``kernels`` importable afterwards.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("bitsandbytes")

CHILD = textwrap.dedent("""
    import importlib.abc, importlib.util, io, json, logging, sys, types

    class ForceAvx512Bf16(importlib.abc.MetaPathFinder):
        # After bitsandbytes.functional executes, report AVX512-BF16 so the CPU backend takes its Hub-kernel branch.
        def find_spec(self, name, path, target=None):
            if name != "bitsandbytes.functional":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            run = spec.loader.exec_module
            def exec_module(module):
                run(module)
                module.has_avx512bf16 = lambda: True
            spec.loader.exec_module = exec_module
            return spec

    calls = []
    def recorder(*args, **kwargs):
        calls.append(args)
        raise RuntimeError("no network in this test")

    try:
        import kernels
    except ImportError:  # transformers < 5 does not need it: a stand-in has the same effect on bitsandbytes
        kernels = sys.modules["kernels"] = types.ModuleType("kernels")
    kernels.get_kernel = recorder
    log = io.StringIO()
    logging.getLogger().addHandler(logging.StreamHandler(log))
    sys.meta_path.insert(0, ForceAvx512Bf16())

    what = sys.argv[1]
    if what == "plain":
        import bitsandbytes.functional
    elif what == "bitsandbytes":
        from deca_ds.optional import bitsandbytes_functional
        bitsandbytes_functional().create_dynamic_map(signed=True)
    else:
        from deca_ds.optional import import_peft
        import_peft().LoraConfig
    from kernels import get_kernel
    print(json.dumps({"calls": len(calls), "log": log.getvalue(), "kernels_back": get_kernel is recorder,
                      "bnb": "bitsandbytes.functional" in sys.modules}))
""")


def _child(what: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, what], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_plain_import_asks_the_hub_for_the_kernel():
    """The control: without deca_ds.optional, bitsandbytes calls kernels.get_kernel and warns when it fails."""
    r = _child("plain")
    assert r["calls"] == 1 and "gemm_4bit_forward" in r["log"]


@pytest.mark.parametrize("what", ["bitsandbytes", "peft"])
def test_deca_ds_imports_bitsandbytes_without_the_hub_lookup_or_its_warning(what):
    if what == "peft":
        pytest.importorskip("peft")
    r = _child(what)
    assert r == {"calls": 0, "log": "", "kernels_back": True, "bnb": True}
