"""`experiments.inpaint`'s outputs: docs/masks.md's recipe for your own mask runs as written and
the mask it saves runs through `--mask-file` (bad mask files: one line, exit 2); figure names
and labels carry the method and its options, so no run overwrites another's figure."""

import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "masks.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), re.S)


@pytest.mark.slow
@pytest.mark.mnist
def test_mask_recipe_from_python_and_the_command_line(tmp_path, monkeypatch, capsys):
    from experiments import inpaint

    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(blocks("python")[0], "docs/masks.md", "exec"), scope)  # noqa: S102
    mask, x, filled = (np.asarray(scope[k]) for k in ("mask", "x", "filled"))
    assert mask.shape == (28, 28, 1) and mask.dtype == bool and (~mask).sum() == 144
    assert filled.shape == x.shape and np.array_equal(filled[:, mask[..., 0]], x[:, mask[..., 0]])
    assert "PSNR over the missing pixels" in capsys.readouterr().out
    saved = np.load(tmp_path / "my_mask.npy")
    np.testing.assert_array_equal(saved, mask)

    (command,) = [c for c in blocks("bash")[0].splitlines() if c.strip()]
    argv = command.split()[3:]
    assert argv[:2] == ["--mask-file", "my_mask.npy"]
    # the doc's command, made cheap: 2 images, the course's pixel method for 3 steps
    argv = [*argv[:2], "--images", "0:2", "--method", "pgd", "--steps", "3", "--out", str(tmp_path), "--json"]
    assert inpaint.main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert '"mask": "file:my_mask.npy"' in out
    assert (tmp_path / "inpaint_realnvp_my_mask_pgd_steps3.png").is_file()


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    (np.ones((27, 28), bool), r"shape \(27, 28\), need \(28, 28\) or \(28, 28, 1\)"),
    (np.full((28, 28), 2, np.uint8), "values other than 0 and 1"),
    (np.full((28, 28), np.nan), "values other than 0 and 1"),
    (np.ones((28, 28, 1), np.int64), "every pixel is observed"),
    (np.zeros((28, 28)), "no pixel is observed"),
    ("text", "not a NumPy .npy file"),
])
def test_bad_mask_files_get_one_line_naming_the_file(tmp_path, capsys, content, message):
    from experiments import inpaint

    path = tmp_path / "m.npy"
    if isinstance(content, np.ndarray):
        np.save(path, content)
    elif content is not None:
        path.write_text(content)
    assert inpaint.main(["--mask-file", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--mask-file {path}: " in err and re.search(message, err), err


def test_mask_and_mask_file_are_exclusive(tmp_path, capsys):
    from experiments import inpaint

    np.save(tmp_path / "m.npy", np.eye(28, dtype=bool))
    assert inpaint.main(["--mask", "hw10", "--mask-file", str(tmp_path / "m.npy")]) == 2
    assert "give one of them" in capsys.readouterr().err


def test_figure_names_and_labels_tell_runs_apart():
    """Every pair of these runs (other method, options, seed, split or mask) writes another file;
    labels name the method and the options that set it apart from its defaults."""
    from experiments import inpaint

    runs = [[], ["--method", "pgd"], ["--method", "latent,pgd"], ["--steps", "5"], ["--starts", "8"],
            ["--temperature", "inf"], ["--rounds", "2"], ["--lr", "0.01"], ["--seed", "1"],
            ["--split", "validation"], ["--mask", "center"], ["--method", "pgd", "--lr", "0.01"],
            ["--starts", "32"]]  # the default value: the default run's name
    names = [inpaint.figure_name(inpaint.parse_args(r), next(iter(inpaint.parse_args(r).masks))) for r in runs]
    assert names[0] == "inpaint_realnvp_hw10_latent.png" == names[-1]
    assert len(set(names[:-1])) == len(runs) - 1, names
    a = inpaint.parse_args(["--steps", "5", "--starts", "8", "--temperature", "inf"])
    assert inpaint.run_label(a, "latent", 5) == "latent (5 steps, starts 8, temperature inf)"
    assert inpaint.run_label(inpaint.parse_args([]), "latent", 15) == "latent (15 steps)"
