"""download_model.py --tiny: atomic, reusable, refuses to clobber an unfinished directory."""
from conftest import run_script


def test_help_shows_examples():
    proc = run_script("download_model.py", "--help")
    assert proc.returncode == 0 and "python download_model.py --tiny" in proc.stdout


def test_tiny_build_is_complete_and_reused(tiny_model):
    manifest = (tiny_model / "manifest.json").read_text()
    assert '"source": "tiny"' in manifest and "model.safetensors.index.json" in manifest
    assert not list(tiny_model.parent.glob(".tiny-qwen3.tmp-*"))  # the temporary directory is gone
    proc = run_script("download_model.py", "--tiny", "--tiny-dir", str(tiny_model))
    assert proc.returncode == 0 and "reusing it" in proc.stdout
    assert (tiny_model / "manifest.json").read_text() == manifest


def test_incomplete_directory_needs_force(tmp_path):
    target = tmp_path / "half"
    target.mkdir()
    (target / "config.json").write_text("{}")
    proc = run_script("download_model.py", "--tiny", "--tiny-dir", str(target))
    assert proc.returncode == 1 and "--force" in proc.stderr and "Traceback" not in proc.stderr
    assert (target / "config.json").read_text() == "{}"  # nothing of the user's was touched
