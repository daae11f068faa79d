"""The wheel carries what the CLI and the quickstart need.

Builds the wheel from a copy of the source tree (so no `build/` folder lands in the checkout), installs it with
`--no-deps --no-index` into a fresh venv outside the source tree, and runs `lmforge` from a directory that has no
`configs/` folder. The fresh venv gets the dev environment's dependencies through a `.pth` file that lists the
dev site-packages directory; a directory merely listed on `sys.path` has its own `.pth` files ignored, so the dev
venv's editable install (`__editable__.lmforge-*.pth` -> the source tree) does not leak in, which the first test
checks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
# Files setuptools reads at the top of the tree; the package itself comes from src/.
TOP_LEVEL = ("pyproject.toml", "setup.py", "setup.cfg", "MANIFEST.in", "README.md", "LICENSE", "LICENSE.txt",
             "NOTICE")
SHIPPED = [
    "lmforge/configs/train/quickstart.yaml",
    "lmforge/configs/data/quickstart_mix.yaml",
    "lmforge/configs/model/olmo2-tiny.yaml",
    "lmforge/curation/taggers/resources/naughty_words_en.txt",
]


def _run(argv: list, *, cwd: Path, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _check(proc: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"{what} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def _clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "VIRTUAL_ENV")}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONNOUSERSITE="1", **extra)
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Probed in a child process: importing setuptools here would tangle with pytest's own distutils import.
    probe = _run([sys.executable, "-c", textwrap.dedent("""
        import importlib.util
        missing = []
        try:  # before any look-up of pip: setuptools' distutils shim stands down once pip is looked up
            import setuptools.build_meta
        except ImportError:
            missing.append("setuptools")
        else:  # setuptools >= 70.1 has bdist_wheel built in; older ones need the `wheel` package.
            if (importlib.util.find_spec("setuptools.command.bdist_wheel") is None
                    and importlib.util.find_spec("wheel") is None):
                missing.append("wheel (or setuptools >= 70.1)")
        if importlib.util.find_spec("pip") is None:
            missing.append("pip")
        print(", ".join(missing))
    """)], cwd=tmp_path_factory.getbasetemp(), env=_clean_env())
    _check(probe, "probe for pip/setuptools")
    if probe.stdout.strip():
        pytest.skip(f"cannot build the wheel offline: {probe.stdout.strip()} not installed in {sys.executable}")
    base = tmp_path_factory.mktemp("build")
    tree = base / "tree"
    tree.mkdir()
    for name in TOP_LEVEL:
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, tree / name)
    shutil.copytree(SRC, tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    out = base / "dist"
    _check(_run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                 "-w", out, tree], cwd=base, env=_clean_env()), "pip wheel")
    wheels = sorted(out.glob("lmforge-*.whl"))
    assert len(wheels) == 1, f"expected one lmforge wheel in {out}, got {[w.name for w in out.iterdir()]}"
    return wheels[0]


class Fresh:
    def __init__(self, venv: Path, cwd: Path, env: dict):
        self.venv, self.cwd, self.env = venv, cwd, env
        self.bin = venv / ("Scripts" if os.name == "nt" else "bin")
        self.python = self.bin / ("python.exe" if os.name == "nt" else "python")

    def run(self, *argv, what: str | None = None) -> subprocess.CompletedProcess:
        return _check(_run(list(argv), cwd=self.cwd, env=self.env), what or " ".join(str(a) for a in argv))

    def lmforge(self, *args: str) -> subprocess.CompletedProcess:
        return self.run(self.bin / "lmforge", *args, what="lmforge " + " ".join(args))

    def python_json(self, code: str) -> dict:
        out = self.run(self.python, "-c", textwrap.dedent(code), what="fresh-venv python").stdout
        return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def fresh(wheel, tmp_path_factory) -> Fresh:
    base = tmp_path_factory.mktemp("fresh")
    venv = base / "venv"
    _check(_run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=base), "python -m venv")
    cwd = base / "cwd"  # no configs/ here: relative config paths must come from the wheel
    cwd.mkdir()
    env = _clean_env(VIRTUAL_ENV=str(venv))
    fresh = Fresh(venv, cwd, env)
    env["PATH"] = os.pathsep.join([str(fresh.bin), env.get("PATH", "")])
    # The dev pip installs into the fresh interpreter (`--python`, pip >= 22.3), which saves bootstrapping pip
    # there; an older pip gets a venv with its own pip instead.
    install = ["install", "--no-deps", "--no-index", "--no-compile", str(wheel)]
    proc = _run([sys.executable, "-m", "pip", "--python", fresh.python, *install], cwd=cwd, env=env)
    if proc.returncode != 0 and "no such option: --python" in proc.stderr:
        _check(_run([sys.executable, "-m", "venv", "--clear", venv], cwd=base), "python -m venv (with pip)")
        proc = _run([fresh.python, "-m", "pip", *install], cwd=cwd, env=env)
    _check(proc, "pip install the wheel")
    site = fresh.python_json("import json, sysconfig; print(json.dumps(sysconfig.get_paths()))")
    dev_dirs = list(dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib")))
    for d in dev_dirs:
        assert not Path(d).resolve().is_relative_to(SRC), f"dev site-packages {d} is inside the source tree"
    Path(site["purelib"], "_lmforge_dev_dependencies.pth").write_text("\n".join(dev_dirs) + "\n", encoding="utf-8")
    return fresh


def test_wheel_ships_configs_and_resources(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [n for n in SHIPPED if n not in names]
    assert not missing, f"{wheel.name} lacks {missing} (pyproject.toml [tool.setuptools.package-data])"


def test_lmforge_imports_from_the_fresh_venv_not_the_source_tree(fresh):
    info = fresh.python_json("""
        import json, sys, lmforge
        print(json.dumps({"file": lmforge.__file__, "path": sys.path}))
    """)
    assert Path(info["file"]).resolve().is_relative_to(fresh.venv.resolve()), info["file"]
    assert not [p for p in info["path"] if p and Path(p).resolve().is_relative_to(SRC)], info["path"]


def test_console_script_help(fresh):
    out = fresh.lmforge("--help").stdout
    assert "usage: lmforge" in out and "model" in out


def test_preset_lookup_matches_the_dev_install(fresh):
    from lmforge.model.info import model_info
    from lmforge.model.presets import get_preset

    expected = model_info(get_preset("olmo2-tiny"))["parameters"]
    by_name = json.loads(fresh.lmforge("model", "info", "olmo2-tiny", "--json").stdout)
    assert by_name["parameters"] == expected
    # A path the docs name, relative to a checkout; this cwd has none, so the copy in the wheel is read.
    assert not (fresh.cwd / "configs").exists()
    by_file = json.loads(fresh.lmforge("model", "info", "configs/model/olmo2-tiny.yaml", "--json").stdout)
    assert by_file["parameters"] == expected


def test_quickstart_configs_load_from_the_wheel(fresh):
    info = fresh.python_json("""
        import json, sys, tempfile
        from pathlib import Path
        from lmforge.core.config import config_path, load_config, packaged_config
        from lmforge.curation.mixer import MixerConfig
        from lmforge.recipes.quickstart import rewrite_paths
        from lmforge.train.config import TrainConfig

        train_path = packaged_config("train/quickstart.yaml")
        mix_path = packaged_config("data/quickstart_mix.yaml")
        # What `make quickstart` does: copy the shipped configs with their paths pointed at the output folder,
        # and name the token directory and run directory on the command line.
        out = Path(tempfile.mkdtemp())
        overrides = [f"data.paths=[{out / 'tokens'}]", f"run_dir={out / 'run'}"]
        train = load_config(TrainConfig, train_path, overrides)
        mix = load_config(MixerConfig, mix_path)
        train2 = load_config(TrainConfig, rewrite_paths("train/quickstart.yaml", out, out / "train.yaml"), overrides)
        mix2 = load_config(MixerConfig, rewrite_paths("data/quickstart_mix.yaml", out, out / "mix.yaml"))
        print(json.dumps({
            "prefix": sys.prefix,
            "paths": [str(train_path), str(mix_path), str(config_path("configs/train/quickstart.yaml")),
                      str(config_path("data/quickstart_mix.yaml"))],
            "streams": [len(mix.streams), len(mix2.streams)],
            "same_model": train.model == train2.model,
        }))
    """)
    for p in info["paths"]:
        assert Path(p).is_file() and Path(p).resolve().is_relative_to(fresh.venv.resolve()), p
    assert info["streams"][0] > 0 and info["streams"][0] == info["streams"][1]
    assert info["same_model"]


def test_tagger_resources_ship(fresh):
    info = fresh.python_json("""
        import json
        from importlib import resources
        from lmforge.curation.taggers.c4 import naughty_words
        path = resources.files("lmforge.curation.taggers") / "resources" / "naughty_words_en.txt"
        print(json.dumps({"path": str(path), "is_file": path.is_file(), "tokens": len(naughty_words()[0])}))
    """)
    assert info["is_file"] and Path(info["path"]).resolve().is_relative_to(fresh.venv.resolve()), info["path"]
    assert info["tokens"] > 0
