"""MkDocs hook: a study page that ``pipeline.run report`` has not rendered yet gets a stub.

The navigation names the study's pages (``ablation.md``) before a checkout necessarily holds them:
``report`` writes them from the records in ``docs/studies/`` when a study has results. Without the
page, ``mkdocs build --strict`` would fail on the navigation and on every link to it; the stub says
what is missing and how it is made. A rendered page always wins.
"""

from __future__ import annotations

PENDING = {
    "ablation.md": (
        "# The generator-recipe ablation\n\n"
        "Not rendered yet: the ablation is running, its records are in `docs/studies/ablation/` "
        "(one folder per recipe variant, `pipeline/configs/ablation/*.yaml`). "
        "`python -m pipeline.run report variants=[...] out=docs/ablation.md`, given the variants' "
        "records folders, renders this page from them alone.\n\n"
        "Meanwhile: [the gain study](gain-study.md), [its results](gain.md).\n"
    ),
}


def on_files(files, config):
    # imported here so that tests/test_docs.py reads PENDING without MkDocs installed
    from mkdocs.structure.files import File

    for path, text in PENDING.items():
        if files.get_file_from_path(path) is None:
            files.append(File.generated(config, path, content=text))
    return files
