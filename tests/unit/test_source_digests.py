"""core.digest.SourceDigests: digests of a content-named tree computed once; a user's tree read every time."""

from __future__ import annotations

from pathlib import Path

from kernel_ci.core.digest import SourceDigests, tree_digest


def _tree(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    (root / "tools" / "testing").mkdir(parents=True)
    (root / "tools" / "testing" / "Makefile").write_text("all:\n")
    (root / "Kconfig").write_text("config X\n")
    return root


def test_a_tree_without_memo_is_read_every_time(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    digests = SourceDigests(root)
    first = digests.digest("kselftest", lambda: ["tools", "Kconfig"])
    assert first == tree_digest(root, ["tools", "Kconfig"])
    (root / "Kconfig").write_text("config Y\n")
    assert digests.digest("kselftest", lambda: ["tools", "Kconfig"]) != first


def test_a_content_named_tree_is_read_once_per_name(tmp_path: Path) -> None:
    root, memo = _tree(tmp_path), tmp_path / "src.digests.json"
    asked: list[str] = []

    def parts() -> list[str]:
        asked.append("walk")
        return ["tools"]

    first = SourceDigests(root, memo).digest("kselftest 1", parts)
    assert first == tree_digest(root, ["tools"])
    (root / "tools" / "testing" / "Makefile").write_text("changed: never done to such a tree\n")
    assert SourceDigests(root, memo).digest("kselftest 1", parts) == first, "remembered, not read again"
    assert asked == ["walk"]
    other = SourceDigests(root, memo).digest("configure 1", lambda: ["Kconfig"])
    assert other == tree_digest(root, ["Kconfig"]) and len(asked) == 1
    assert SourceDigests(root, memo).digest("kselftest 1", parts) == first  # both names kept


def test_a_damaged_memo_is_computed_again(tmp_path: Path) -> None:
    root, memo = _tree(tmp_path), tmp_path / "src.digests.json"
    for text in ("not json", "[1, 2]", '{"kselftest 1": 5}'):
        memo.write_text(text)
        assert SourceDigests(root, memo).digest("kselftest 1", lambda: ["tools"]) == tree_digest(
            root, ["tools"]
        )
