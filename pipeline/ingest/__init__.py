"""``python -m pipeline.run ingest SOURCE [--out data_manifests/NAME.csv] [key=value ...]``.

SOURCE is a folder, a MedMNIST-style ``.npz``, or a CSV with ``path,label`` and optional
``patient_id,split``. Every file is decoded once (so a manifest never lists an image that cannot
be read), hashed on its pixels, and recorded; files that fail go to a quarantine report with a
one-line reason and the rest still ingest, unless more than ``max_quarantined`` of them fail.

Folder layouts (the summary names the one it recognised): split folders (``train|training``,
``val|valid|validation|dev``, ``test|testing``, any case) then class folders, class then split,
class folders alone, split folders alone, flat, or deeper trees (CheXpert, MIMIC-CXR, NIH) whose
labels come from a table (``labels=``). Class folder names are free: a leading number gives the
class index (``0_normal`` -> 0 ``normal``); otherwise ``normal`` is 0 and the rest follow
alphabetically; ``label_names=`` overrides both.

Patient ids: ``patient_pattern=`` if given, else a table's patient column (pseudonymised unless
``clear_patient_ids=true``), else DICOM PatientID (pseudonymised), else the public-set naming
rules of :func:`~pipeline.ingest.patients.patient_from_path`.

Splits: the source's ``test`` split is kept as it is. ``val`` is carved from the remaining images
**by patient** (stratified by label), so no patient is in both train and val. A source ``val``
folder is merged into the pool first: the Kaggle copy's ``val`` shares patients with ``train``.

All paths are taken relative to the *resolved* data root, and each file is judged by what it
really is: a symlinked root is fine, a symlink inside it that leads outside is quarantined.

The stage's modules, in the order a run uses them: :mod:`~pipeline.ingest.sources` (which kind
of source, :mod:`~pipeline.ingest.folders`, :mod:`~pipeline.ingest.tables`,
:mod:`~pipeline.ingest.npz`: the candidate files, each a :class:`~pipeline.ingest.candidates.Candidate`),
:mod:`~pipeline.ingest.labels` (label values -> class indices and names),
:mod:`~pipeline.ingest.patients` (patient ids from public-set file names),
:mod:`~pipeline.ingest.decode` (screening, decoding, hashing), :mod:`~pipeline.ingest.stage`
(``ingest(cfg)``: the val carve, duplicates, the manifest), :mod:`~pipeline.ingest.report` (the
sidecar and the summary) and :mod:`~pipeline.ingest.default` (the embedded phantom data set's
manifest, the default of every stage given none).
"""
