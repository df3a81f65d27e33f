"""Run a training stage in one process or under `accelerate launch`, as params.yaml's `launcher` says.

    python -m searchrl.launch tasks.sft            # dvc.yaml's sft command
    python -m searchrl.launch tasks.rl --ablation r1searcher

With `launcher.processes: 1` and no accelerate config this is `python -m tasks.sft`. Otherwise it
execs

    accelerate launch --config_file <launcher.config_file> --num_processes <processes>
        [--num_machines M --machine_rank R --main_process_ip IP --main_process_port P] -m tasks.sft

(configs/accelerate/: ddp.yaml, fsdp.yaml, zero3.yaml). The launcher section is not a DVC params
dependency: running the same stage on more GPUs does not make its outputs stale. The process is
replaced (exec), so signals (a killed `dvc repro`) reach the training processes directly.
"""

from __future__ import annotations

import os
import shutil
import sys

from searchrl.config import LauncherCfg, load_params, resolve_input
from searchrl.errors import ConfigError

USAGE = "python -m searchrl.launch MODULE [ARGS...]   (e.g. tasks.sft, or tasks.rl --ablation NAME)"


def command(cfg: LauncherCfg, module: str, args: list[str]) -> list[str]:
    """The argv that runs `python -m module args` under the launcher settings."""
    if cfg.processes <= 1 and not cfg.config_file and cfg.machines <= 1:
        return [sys.executable, "-m", module, *args]
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if accelerate is None:
        raise ConfigError("launcher: 'accelerate' is not installed in this environment (pip install accelerate)")
    cmd = [accelerate, "launch"]
    if cfg.config_file:
        path = resolve_input(cfg.config_file)
        if not path.is_file():
            raise ConfigError(f"launcher.config_file: file not found: {cfg.config_file}")
        cmd += ["--config_file", str(path)]
    cmd += ["--num_processes", str(cfg.processes * cfg.machines)]
    if cfg.machines > 1:
        cmd += ["--num_machines", str(cfg.machines), "--machine_rank", str(cfg.machine_rank),
                "--main_process_ip", cfg.main_process_ip, "--main_process_port", str(cfg.main_process_port)]
    cmd += list(cfg.extra_args)
    return [*cmd, "-m", module, *args]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(f"usage: {USAGE}\nlaunch: error: name the module to run", file=sys.stderr)
        sys.exit(2)
    if argv[0] in ("-h", "--help"):
        print(f"usage: {USAGE}\n\n{__doc__}")
        sys.exit(0)
    module, args = argv[0], argv[1:]
    if "-h" in args or "--help" in args:  # the stage's own help: one plain process, no params.yaml needed
        os.execv(sys.executable, [sys.executable, "-m", module, *args])
    try:
        cfg = load_params("params.yaml").launcher
        cmd = command(cfg, module, args)
    except ConfigError as err:
        print(f"\nlaunch: error: {err}\n", file=sys.stderr)
        sys.exit(2)
    sys.stdout.flush()
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
