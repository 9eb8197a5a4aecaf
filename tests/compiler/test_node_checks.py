"""The node preflight's checks of the node itself (`dpoc preflight BUILD --node-rank K`, as the node scripts run
it): the launcher's build, the devices, the runtime's packages, the master. Each failure names the node and the
fix, exit 2."""

from __future__ import annotations

import hashlib
import os
import socket
import sys

import pytest

from dpoc.common.ports import free_port
from dpoc.compiler.pipeline import build
from dpoc.compiler.render.targets import dpoc_runtime
from tests.compiler.test_preflight import touch_dataset
from tests.conftest import RECIPES, REPO, run_subprocess

NODE = f"node 0 ({socket.gethostname()})"


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """The tiny build with its inputs on this 'node' (the working directory), so only node checks can fail."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "b"
    plan = build(RECIPES / "tiny_cpu.yaml", out=out)[0]
    os.makedirs("assets/tiny/tokenizer")  # before the dataset stand-in: its stats record the tokenizer's files
    touch_dataset(plan.data.output_prefix, made_by=out)
    return out




def test_a_node_passes_with_its_devices_packages_and_master(tiny, dpoc_cli):
    for rank in ("0", "1"):
        result = dpoc_cli("preflight", tiny, "--node-rank", rank, "--master-port", free_port())
        assert result.code == 0, result.err


def test_a_node_holding_another_build_is_refused(tiny, dpoc_cli, tmp_path):
    other = tmp_path / "other"
    build(RECIPES / "tiny_cpu.yaml", ["training.lr=1e-4"], out=other)
    launched = hashlib.sha256((other / "plan.json").read_bytes()).hexdigest()
    here = hashlib.sha256((tiny / "plan.json").read_bytes()).hexdigest()
    result = dpoc_cli("preflight", tiny, "--node-rank", "0", "--plan-hash", launched)
    assert result.code == 2
    assert result.err == (f"{NODE}: {tiny}/plan.json: is plan {here[:12]}, but the launcher started plan "
                          f"{launched[:12]}: this node holds another build; fix: copy the launching machine's build "
                          "directory to this node at the same path (or rebuild both from the same recipe)\n")
    assert dpoc_cli("preflight", tiny, "--node-rank", "0", "--plan-hash", here, "--master-port", free_port()).code == 0


def test_master_port_in_use_and_master_elsewhere_on_node_0(tiny, dpoc_cli):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = dpoc_cli("preflight", tiny, "--node-rank", "0", "--master-port", port)
    assert result.code == 2
    assert result.err == (f"{NODE}: master 127.0.0.1:{port}: port {port} is in use on this node; fix: stop what holds "
                          "it, or pick a free one (DPOC_MASTER_PORT, or hardware.master_port)\n")
    result = dpoc_cli("preflight", tiny, "--node-rank", "0", "--master-addr", "192.0.2.7", "--master-port", "6005")
    assert result.err == (f"{NODE}: master 192.0.2.7:6005: 192.0.2.7 is not an address of this node, which is node 0; "
                          "fix: list node 0's own address first in hardware.hosts (or set hardware.master_addr)\n")


def test_other_ranks_need_a_master_that_resolves(tiny, dpoc_cli):
    result = dpoc_cli("preflight", tiny, "--node-rank", "1", "--master-addr", "no-such-node.invalid")
    assert result.code == 2
    assert result.err == (f"node 1 ({socket.gethostname()}): master no-such-node.invalid:6005: no-such-node.invalid "
                          "does not resolve on this node; fix: put node 0's IP address in hardware.hosts, or add the "
                          "name to /etc/hosts\n")
    # nothing listens there yet: refused means the host answered, as node 0's torchrun may simply not be up
    assert dpoc_cli("preflight", tiny, "--node-rank", "1", "--master-port", free_port()).code == 0


def test_ascend_node_checks_devices_torch_npu_and_cann(tmp_path, dpoc_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "b"
    build(RECIPES / "qwen3_30b_a2.yaml", out=out)
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "0,1,2,3")  # as Ray sets it for an actor holding 4 NPUs
    monkeypatch.setenv("ASCEND_TOOLKIT_HOME", str(tmp_path / "Ascend/latest"))
    node = [ln for ln in dpoc_cli("preflight", out, "--node-rank", "0", "--master-port", free_port()).err.splitlines()
            if ln.startswith(NODE)]
    assert node == [
        f"{NODE}: hardware.devices_per_node: 8 npu processes per node, but 4 devices are visible "
        "(ASCEND_RT_VISIBLE_DEVICES=0,1,2,3); fix: install the Ascend driver, or run on an Atlas node, or set "
        "hardware.devices_per_node=4 and rebuild",
        f"{NODE}: torch_npu: not importable here ({sys.executable}); fix: install torch_npu>=2.5 in the "
        "environment the node scripts run in",
        f"{NODE}: CANN: toolkit not found ({tmp_path}/Ascend/latest); fix: install CANN >= 8.1 and source its "
        "set_env.sh (the node script sources /usr/local/Ascend/ascend-toolkit/set_env.sh when it exists)",
    ]
    info = tmp_path / "Ascend/latest/aarch64-linux/ascend_toolkit_install.info"
    info.parent.mkdir(parents=True)
    info.write_text("package_name=Ascend-cann-toolkit\nversion=8.0.RC3\n")
    err = dpoc_cli("preflight", out, "--node-rank", "0", "--master-port", free_port()).err
    assert (f"{NODE}: CANN: 8.0.RC3 at {tmp_path}/Ascend/latest is older than 8.1; fix: upgrade CANN to the release "
            "of your torch_npu") in err.splitlines()


def test_a_runtime_package_at_a_version_the_target_cannot_run(tiny, tmp_path):
    """A real installed-distribution lookup: an older megatron-core's metadata first on the node's Python path."""
    site = tmp_path / "site"
    (site / "megatron_core-0.9.0.dist-info").mkdir(parents=True)
    (site / "megatron_core-0.9.0.dist-info/METADATA").write_text("Metadata-Version: 2.1\nName: megatron-core\n"
                                                                  "Version: 0.9.0\n")
    proc = run_subprocess("preflight", tiny, "--node-rank", "1", "--master-port", free_port(), cwd=tmp_path,
                          env={"PYTHONPATH": f"{site}:{REPO}"})
    assert proc.returncode == 2
    assert proc.stderr == (f"node 1 ({socket.gethostname()}): megatron-core: 0.9.0 is installed, but the runtime "
                           "needs megatron-core>=0.12,<0.20; fix: pip install 'megatron-core>=0.12,<0.20'\n")


def test_the_runtime_requirements_are_the_runtime_extra():
    extra = (REPO / "pyproject.toml").read_text().split("\nruntime = [", 1)[1].split("]", 1)[0]  # no tomllib on 3.10
    for req in dpoc_runtime.requirements():
        bounds = [f">={'.'.join(map(str, req.minimum))}"] + ([f"<{'.'.join(map(str, req.below))}"] if req.below else [])
        assert f'"{req.dist}{",".join(bounds)}"' in extra
