"""Bad input on the command line: exit code 2 and one line ``jaxcf: error: ...`` naming what is
wrong and what is allowed, before anything compiles, and no traceback.

Each case is a real ``python -m jaxcf.main`` run. To keep the table fast they run in one warm
interpreter that forks per case and runs the module as ``python -m`` does (``tests/cli_cases.py``);
three of them also run as plain subprocesses and must print the same. ``JAX_LOG_COMPILES=1`` makes
any compilation print a line, so "one stderr line" also proves nothing was compiled.
"""

import json
import os
import subprocess
import sys

import pytest

from jaxcf.utils.lock import WorkdirLock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DICAP, DIDAE, DIFFUSION = ("--config=" + os.path.join(ROOT, "configs", f"{n}.py") for n in ("dicap", "didae", "diffusion"))

# (name, argv without --workdir (added unless the case gives one), what stderr's one line must contain).
# {file}: an existing file; {empty}: an empty folder; {locked}: a workdir held by a live run.
CASES = [
    # flags and config files
    ("no_config", ["--workdir={work}"], "--config is required"),
    ("config_file_missing", ["--config=configs/nosuch.py"], "cannot load the config file 'configs/nosuch.py'"),
    ("unknown_variant", [f"{DICAP}:nonexistent"], "unknown variant 'nonexistent' for pipeline 'dicap'; allowed: toy, toy_csc, test"),
    ("unknown_variant_didae", [f"{DIDAE}:huge"], "unknown variant 'huge' for pipeline 'didae'; allowed:"),
    ("unknown_field", [f"{DICAP}:test", "--config.nosuchfield=1"],
     "--config.nosuchfield: config has no field 'nosuchfield'; its fields: checkpoint_every, counterfactual"),
    ("unknown_nested_field", [f"{DICAP}:test", "--config.train.nosuch=1"],
     "config.train has no field 'nosuch'; its fields: all_classes, batch_size"),
    ("field_of_a_value", [f"{DICAP}:test", "--config.train.steps.x=1"],
     "config.train.steps=6 is a value, not a group of fields"),
    ("wrong_type", [f"{DICAP}:test", "--config.train.steps=abc"], "--config.train.steps=abc: not a valid int"),
    ("unknown_flag", [f"{DICAP}:test", "--nosuchflag=1"], "unknown flag 'nosuchflag'; jaxcf's flags: --config"),
    ("positional_argument", [f"{DICAP}:test", "extra"], "unexpected arguments: extra"),
    ("distributed_mode", [f"{DICAP}:test", "--distributed=maybe"], "--distributed=maybe: value should be one of <auto|on|off>"),
    ("batch_on_split_cpu", [f"{DICAP}:test", "--cpu_devices=2", "--config.train.batch_size=7"],
     "config.train.batch_size=7 must be divisible by the 2 devices of the mesh axis 'data' (this CPU is split"),
    ("cpu_devices", [f"{DICAP}:test", "--cpu_devices=0"], "--cpu_devices='0' is not allowed; allowed: auto or a positive integer"),
    ("cpu_malloc", [f"{DICAP}:test", "--cpu_malloc=yes"], "--cpu_malloc='yes' is not allowed; allowed: auto, on, off"),
    # paths and the workdir
    ("no_workdir", [f"{DICAP}:test", "--workdir="], "--workdir is required"),
    ("workdir_is_a_file", [f"{DICAP}:test", "--workdir={file}"], "is a file; give a folder"),
    ("workdir_in_use", [f"{DICAP}:test", "--workdir={locked}"], "is in use by another run: pid"),
    # the mesh (a list field, given as axis:size pairs)
    ("mesh_too_many_devices", [f"{DICAP}:test", "--config.mesh=data:3"], "config.mesh [('data', 3)] needs 3 devices, but "),
    ("mesh_no_data_axis", [f"{DICAP}:test", "--config.mesh=model:-1"], "config.mesh=[('model', -1)] needs a 'data' axis"),
    ("mesh_malformed", [f"{DICAP}:test", "--config.mesh=data"], "--config.mesh='data' must be axis:size pairs"),
    ("mesh_repeated_axis", [f"{DICAP}:test", "--config.mesh=data:-1,data:1"], "repeated axis names"),
    ("mesh_two_free_axes", [f"{DICAP}:test", "--config.mesh=data:-1,model:-1"], "at most one axis may have size -1"),
    ("mesh_zero", [f"{DICAP}:test", "--config.mesh=[('data', 0)]"], "sizes must be positive or -1"),
    # common fields
    ("unknown_pipeline", [f"{DICAP}:test", "--config.pipeline=gan"], "config.pipeline='gan' is unknown; allowed: diffusion"),
    ("dtype", [f"{DICAP}:test", "--config.dtype=float16"], "config.dtype='float16' is not allowed; allowed: 'float32'"),
    ("param_sharding", [f"{DICAP}:test", "--config.param_sharding=zero3"], "config.param_sharding='zero3' is not allowed"),
    ("negative_seed", [f"{DICAP}:test", "--config.seed=-1"], "config.seed=-1 must be an integer >= 0"),
    ("checkpoint_every", [f"{DICAP}:test", "--config.checkpoint_every=0"], "config.checkpoint_every=0 must be an integer >= 1"),
    # DiCap
    ("negative_scale", [f"{DICAP}:test", "--config.counterfactual.scale=-1"], "config.counterfactual.scale=-1.0 must be in [0.0, inf]"),
    ("photo_fraction", [f"{DICAP}:test", "--config.foundation.clip_train.photo_fraction=2"],
     "config.foundation.clip_train.photo_fraction=2.0 must be in [0.0, 1.0]"),
    ("depth", [f"{DICAP}:test", "--config.counterfactual.depth=1.5"], "config.counterfactual.depth=1.5 must be in (0.0, 1.0]"),
    ("cf_target", [f"{DICAP}:test", "--config.counterfactual.target=nearest"],
     "config.counterfactual.target='nearest' is not allowed; allowed: 'similarity', 'random'"),
    ("ddim_steps", [f"{DICAP}:test", "--config.counterfactual.ddim_steps=700"], "ddim_steps=700 exceeds the 500 timesteps available at depth 0.5"),
    ("class_name", [f"{DICAP}:test", "--config.data.novel_classes=('heart', 'unicorn')"],
     "unknown class name 'unicorn'; allowed: circle"),
    ("batch_vs_shots", [f"{DICAP}:test", "--config.train.batch_size=64"], "batch_size=64 is larger than the 24 few-shot"),
    ("no_seeds", [f"{DICAP}:test", "--config.seeds=()"], "config.seeds=() must be a non-empty list"),
    ("learning_rate", [f"{DICAP}:test", "--config.train.learning_rate=0"], "config.train.learning_rate=0.0 must be in (0.0, 10.0]"),
    ("prompt_mode", [f"{DICAP}:test", "--config.prompt.mode=maple"], "config.prompt.mode='maple' is not allowed"),
    ("foundation_assets", [f"{DICAP}:test", "--config.foundation.assets=no_such_weights"],
     "config.foundation.assets='no_such_weights': no such folder"),
    ("dataset_name", [f"{DICAP}:caltech101", "--config.data.name=imagenet"], "config.data.name='imagenet' is not allowed; allowed: 'shapes'"),
    ("tfds_not_prepared", [f"{DICAP}:caltech101", "--config.data.data_dir={empty}"],
     "tfds dataset 'caltech101' is not prepared under data_dir="),
    ("clip_checkpoint_folder", [f"{DICAP}:caltech101", "--config.foundation.clip_checkpoint=/no/such/clip"],
     "config.foundation.clip_checkpoint='/no/such/clip': no such checkpoint folder"),
    # DiDAE
    ("dictionary_larger_than_embedding", [f"{DIDAE}:test", "--config.dictionary.kinds=('svd',)",
                                          "--config.dictionary.num_atoms=9"],
     "config.dictionary.num_atoms=9 is larger than the embedding size D=8"),
    ("dictionary_vs_factors", [f"{DIDAE}:test", "--config.dictionary.num_atoms=3"],
     "config.dictionary.num_atoms=3 must equal the number of factors 4"),
    ("dictionary_kind", [f"{DIDAE}:test", "--config.dictionary.kinds=('pca',)"], "must be a non-empty subset of ('procrustes', 'svd')"),
    ("true_factor", [f"{DIDAE}:test", "--config.cfkd.true_factor=Colour"], "config.cfkd.true_factor='Colour' is not a factor"),
    ("student_kind", [f"{DIDAE}:test", "--config.student.kind=vit"], "config.student.kind='vit' is not allowed; allowed: 'resnet18'"),
    ("agree_fraction", [f"{DIDAE}:test", "--config.data.agree_fraction=1.5"], "config.data.agree_fraction=1.5 must be in [0.0, 1.0]"),
    ("encoder_checkpoint", [f"{DIDAE}:celeba", "--config.encoder.checkpoint=/no/such/clip"],
     "config.encoder.checkpoint='/no/such/clip': no such checkpoint folder"),
    ("celeba_not_prepared", [f"{DIDAE}:celeba", "--config.encoder.checkpoint={empty}", "--config.data.data_dir={empty}"],
     "tfds dataset 'celeb_a' is not prepared under data_dir="),
    # diffusion
    ("schedule", [f"{DIFFUSION}:test", "--config.schedule.name=sigmoid"], "config.schedule.name='sigmoid' is not allowed"),
    ("unet_block", [f"{DIFFUSION}:test", "--config.model.config.down_block_types=('NoSuchBlock', 'DownBlock2D')"],
     "NoSuchBlock"),
]


def _argv(args, paths, i):
    out = [a.format(**paths, work=os.path.join(paths["tmp"], f"w{i}")) for a in args]
    if not any(a.startswith("--workdir") for a in out):
        out.append(f"--workdir={os.path.join(paths['tmp'], f'w{i}')}")
    return out


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", JAX_LOG_COMPILES="1", XLA_FLAGS="")


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "file").write_text("not a folder")
    (tmp / "empty").mkdir()
    paths = {"tmp": str(tmp), "file": str(tmp / "file"), "empty": str(tmp / "empty"), "locked": str(tmp / "locked")}
    argvs = [_argv(args, paths, i) for i, (_, args, _) in enumerate(CASES)]
    with WorkdirLock(paths["locked"]):  # a live run holds this workdir for the whole table
        proc = subprocess.run([sys.executable, "-m", "tests.cli_cases"], input=json.dumps(argvs), capture_output=True,
                              text=True, cwd=ROOT, env=_env(), timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results = json.loads(proc.stdout)
        plain = {}
        for i in (2, 4, 14):  # unknown variant, unknown field, the mesh: also as plain subprocesses
            p = subprocess.run([sys.executable, "-m", "jaxcf.main", *argvs[i]], capture_output=True, text=True,
                               cwd=ROOT, env=_env(), timeout=120)
            plain[i] = {"rc": p.returncode, "stderr": p.stderr}
    return {name: r for (name, _, _), r in zip(CASES, results)}, plain, tmp


def test_the_table_has_30_distinct_bad_inputs():
    assert len({name for name, _, _ in CASES}) == len(CASES) >= 30
    assert len({tuple(args) for _, args, _ in CASES}) == len(CASES)


@pytest.mark.parametrize("name,args,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(outcomes, name, args, expected):
    out = outcomes[0][name]
    lines = out["stderr"].splitlines()
    assert out["rc"] == 2, out
    assert len(lines) == 1 and lines[0].startswith("jaxcf: error: "), out["stderr"][-3000:]  # no traceback, no compile
    assert expected in lines[0], lines[0]
    assert out["seconds"] < 30, out  # failed before any real work (a warm child takes ~0.1-1 s)


def test_plain_subprocesses_print_the_same(outcomes):
    results, plain, _ = outcomes
    for i, p in plain.items():
        assert p == {k: results[CASES[i][0]][k] for k in ("rc", "stderr")}, (CASES[i][0], p)


def test_bad_input_leaves_no_workdir_behind(outcomes):
    """Errors found by validation stop before the workdir is made (those found in the data, such as
    an unprepared dataset, stop after the workdir lock is taken; the lock is released)."""
    _, _, tmp = outcomes
    for i, (name, _, _) in enumerate(CASES):
        w = tmp / f"w{i}"
        if name.endswith("not_prepared"):
            assert not (w / "jaxcf.lock").exists(), name
        else:
            assert not w.exists(), name
