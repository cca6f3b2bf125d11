"""Evaluation report: metrics.json (+ the media `s2f.evaluate` collects) -> one HTML file.

The file is self-contained: figures are base64 PNGs drawn with matplotlib's Agg backend, faces are
the shards' own face.jpg bytes inlined as base64 JPEGs, decoded faces as base64 PNGs. Section ids:
summary, similarity, retrieval, identity, matching, attributes, groups, grids, faces, tsne, ethics.

`media` (from `s2f.evaluate.media`):
- angles: {duration: (N,) angles in degrees};
- grid: {duration, rows: [{query, faces: [{key, jpeg (bytes or None), true}]}]}, faces[0] being
  the true face and the rest the retrieved ones, best first;
- embedding: {duration, v_s (P, D), labels: {attribute: (P,) labels, None where unknown}};
- faces (with a decoder, `s2f.decoded_faces.face_grid`): {duration, rows: [{key, true (face.jpg
  bytes or None), portrait (portrait.jpg bytes or None), f2f, s2f (PNG bytes), f2f_detected,
  s2f_detected}]}.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from s2f.metrics import METRICS

SECTIONS = {
    "summary": "Summary",
    "similarity": "Feature similarity",
    "retrieval": "Face retrieval",
    "identity": "Identity retrieval",
    "matching": "1:2 matching",
    "attributes": "Attribute agreement",
    "groups": "Results by group",
    "grids": "Retrieval examples",
    "faces": "Decoded faces: F2F and S2F",
    "tsne": "t-SNE of predicted features",
    "ethics": "What this measures, and what it does not",
}
# The paper's test results (SPEC 7): recall@K in % (cosine, 5,000-face AVSpeech gallery) and mean
# angle in degrees, per input duration.
PAPER_RECALL = {"6s": {1: 10.92, 2: 17.00, 5: 30.60, 10: 45.82}, "3s": {1: 8.54, 2: 13.64, 5: 24.80, 10: 38.54}}
PAPER_ANGLE = {"6s": 45.75, "3s": 48.43}
AGREEMENTS = {  # attribute_agreement key -> what it compares
    "truth_vs_reference": "truth vs read from true face (upper bound)",
    "truth_vs_prediction": "truth vs read from v_s",
    "reference_vs_prediction": "read from true face vs from v_s",
}
READER_NOTES = {  # what each attribute reader of s2f.evaluate.READERS is
    "linear_probe": "A linear classifier per attribute, fitted on the teacher features of training faces "
                    "and applied to the true face's feature (reference) and to v_s (prediction).",
    "agegender_net": "face-api's AgeGenderNet (s2f.agegender) on face images: the clip's own face "
                     "(reference) and the canonical face decoded from v_s (prediction).",
}
TSNE_SEED = 0  # t-SNE random_state: the same features give the same picture
TSNE_PERPLEXITY = 30.0
TSNE_EXACT_MAX = 300  # up to this many points the exact method is faster than Barnes-Hut
DPI = 90
STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0 1.2em}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
th:first-child,td:first-child{text-align:left}caption{text-align:left;font-weight:600;padding:.3em 0}
.note{color:#555;font-size:.92em}.ci{color:#777;font-size:.85em}
.grid img{width:96px;height:96px;border:4px solid transparent;margin:1px}.grid img.true{border-color:#1a9850}
.grid td{text-align:center;font-size:.8em}
.faces img{width:96px;height:96px;margin:1px;image-rendering:pixelated}.faces td{text-align:center;font-size:.8em}
"""


# ----------------------------------------------------------------------------- formatting


def _e(value: Any) -> str:
    return html.escape(str(value))


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _ci(ci: Sequence[float] | None) -> str:
    return "" if ci is None else f' <span class="ci">[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]</span>'


def _value(entry: Mapping[str, Any] | None) -> str:
    """A {value, ci} entry as "12.34 [10.1, 14.6]" (percent)."""
    return "–" if entry is None else _pct(entry["value"]) + _ci(entry.get("ci"))


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], caption: str = "") -> str:
    """Cells are HTML already; the header is escaped."""
    top = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    cap = f"<caption>{_e(caption)}</caption>" if caption else ""
    return f"<table>{cap}<tr>{top}</tr>{body}</table>"


def _note(text: str) -> str:
    return f'<p class="note">{text}</p>'


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _figure(fig) -> str:
    """An <img> of a matplotlib figure (PNG, inlined); closes the figure."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return f'<img src="{_data_uri(buffer.getvalue(), "image/png")}" alt="figure">'


def _pyplot():
    """pyplot on the Agg backend (no display needed), or an error naming the extra."""
    try:
        import matplotlib
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError("the report needs matplotlib: pip install 's2f[report]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ks(recall: Mapping[str, Any]) -> list[int]:
    """The k of every "recall@k" key, ascending."""
    return sorted(int(name.split("@")[1]) for name in recall if name.startswith("recall@"))


def _durations(metrics: Mapping[str, Any]) -> list[str]:
    return list(metrics["config"]["durations"])


def _longest(metrics: Mapping[str, Any]) -> str:
    """The longest evaluated input ("6s"): the one the figures show."""
    return max(_durations(metrics), key=lambda label: float(label.rstrip("s")))


# ----------------------------------------------------------------------------- sections


def summary(metrics: Mapping[str, Any]) -> str:
    config, data = metrics["config"], metrics["data"]
    rows = []
    for label in _durations(metrics):
        result = metrics["retrieval"][label]
        ratio = metrics.get("oracle", {}).get("ratio", {}).get(label, {}).get("cosine", {})
        match = metrics["matching"]["random"]["durations"][label]["cosine"]
        recalls = [_pct(result["cosine"][f"recall@{k}"]["value"])
                   + f' <span class="ci">(chance {_pct(result["chance"][f"recall@{k}"])})</span>' for k in (1, 10)]
        angle = f"{metrics['similarity'][label]['angle_mean']:.2f}"
        rows.append([_e(label), angle, *recalls, _pct(ratio.get("recall@10")), _pct(match["accuracy"])])
    head = ["input", "mean angle (deg)", "R@1 % (cosine)", "R@10 %", "R@10 / oracle %", "1:2 matching %"]
    gallery = metrics["retrieval"][_durations(metrics)[0]]["gallery_size"]
    facts = (f"Checkpoint <code>{_e(config['checkpoint'])}</code> on <code>{_e(config['shards'])}</code>: "
             f"{data['items']} clips of {data['speakers']} speakers ({len(data['skipped'])} bad samples "
             f"skipped); retrieval gallery of {gallery} faces, seed {config['seed']}.")
    return f"<p>{facts}</p>" + _table(head, rows)


def similarity(metrics: Mapping[str, Any], angles: Mapping[str, np.ndarray]) -> str:
    rows = [
        [_e(label), f"{s['angle_mean']:.2f} ± {s['angle_std']:.2f}", f"{s['l1_mean']:.3g} ± {s['l1_std']:.3g}",
         f"{s['l2_mean']:.3g} ± {s['l2_std']:.3g}", f"{PAPER_ANGLE[label]:.2f}" if label in PAPER_ANGLE else "–"]
        for label, s in ((label, metrics["similarity"][label]) for label in _durations(metrics))
    ]
    table = _table(["input", "angle (deg)", "L1", "L2", "paper angle (deg)"], rows,
                   "v_s against the true face's feature v_f, mean ± std over all clips")
    return table + (_angle_histogram(angles) if angles else "")


def _angle_histogram(angles: Mapping[str, np.ndarray]) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    for label, values in angles.items():
        ax.hist(values, bins=40, range=(0, 180), alpha=0.5, label=label)
    ax.set_xlabel("angle between v_s and v_f (degrees)")
    ax.set_ylabel("clips")
    ax.legend()
    return _figure(fig)


def _recall_rows(result: Mapping[str, Any], ks: Sequence[int], chance_name: str) -> list[list[str]]:
    """A row of recall@k {value, ci} per similarity metric, then the chance row."""
    rows = [[_e(metric), *[_value(result[metric][f"recall@{k}"]) for k in ks]] for metric in METRICS]
    return rows + [[chance_name, *[_pct(result["chance"][f"recall@{k}"]) for k in ks]]]


def _oracle_rows(oracle: Mapping[str, Any], label: str, ks: Sequence[int]) -> list[list[str]]:
    rows = [["oracle (voice truths)", *[_value(oracle["recall"].get(f"recall@{k}")) for k in ks]]]
    ratio = oracle["ratio"][label]
    return rows + [[f"{_e(metric)} / oracle (%)", *[_pct(ratio[metric].get(f"recall@{k}")) for k in ks]]
                   for metric in METRICS]


def retrieval(metrics: Mapping[str, Any]) -> str:
    oracle = metrics.get("oracle")
    parts = []
    for label in _durations(metrics):
        result = metrics["retrieval"][label]
        ks = _ks(result["chance"])
        rows = _recall_rows(result, ks, "chance (K / gallery)") + (_oracle_rows(oracle, label, ks) if oracle else [])
        paper = PAPER_RECALL.get(label)
        if paper:
            rows.append(["paper (cosine)", *[f"{paper[k]:.2f}" if k in paper else "–" for k in ks]])
        caption = f"{label} input, recall@K % over a gallery of {result['gallery_size']} faces [95% bootstrap CI]"
        parts.append(_table(["", *[f"R@{k}" for k in ks]], rows, caption))
    notes = [
        "Query: v_s of one clip; gallery: the true-face features v_f of the sampled clips; a query's own "
        "clip is its only match, ties count against the model.",
        "The paper's numbers come from a 5,000-face AVSpeech gallery: compare with the chance row of "
        "this gallery, not directly.",
    ]
    if oracle:
        notes.append(
            f"The oracle predicts each query's face feature from its speaker's true voice-side traits "
            f"({_e(', '.join(oracle['fields']))}) with a linear map fitted on {oracle['n_train']} training "
            "faces, and ranks the gallery by cosine like the model: what a linear reading of those traits "
            "retrieves. A model hears more than these traits and need not be linear, so it may exceed it.")
    return "".join(parts) + "".join(_note(n) for n in notes)


def identity(metrics: Mapping[str, Any]) -> str:
    parts = []
    for label in _durations(metrics):
        result = metrics["identity_retrieval"][label]
        ks = _ks(result["chance"])
        rows = _recall_rows(result, ks, "chance (this gallery)")
        parts.append(_table(["", *[f"R@{k}" for k in ks]], rows, f"{label} input, recall@K % [95% bootstrap CI]"))
    note = ("Any face of the query's speaker in the top K is a hit. Chance depends on how many clips "
            "of each speaker the gallery holds.")
    return "".join(parts) + _note(note)


def matching(metrics: Mapping[str, Any]) -> str:
    rows = []
    for kind, result in sorted(metrics["matching"].items()):
        for label, by_metric in result["durations"].items():
            rows += [[_e(kind.replace("_", "-")), _e(label), _e(metric), _pct(r["accuracy"]) + _ci(r["ci"]),
                      str(result["n_tuples"])] for metric, r in by_metric.items()]
    note = ("Each trial: one voice, its true face and a face of another speaker (of the same gender "
            "for same-gender pairs); correct when the true face scores strictly higher. Chance is 50 %; "
            "95 % Wilson intervals. The trials are fixed in tuples*.json so runs are comparable.")
    return _table(["pairs", "input", "metric", "accuracy %", "trials"], rows) + _note(note)


def attributes(metrics: Mapping[str, Any]) -> str:
    parts = []
    for reader, result in sorted(metrics["attributes"].items()):
        parts.append(f"<h3>Reader: {_e(reader)}</h3>" + _note(READER_NOTES.get(reader, "")))
        if "skipped" in result:
            parts.append(_note(f"Not run: {_e(result['skipped'])}"))
            continue
        parts += [_attribute(name, entry, _longest(metrics)) for name, entry in sorted(result.items())]
    note = ("Confusion rows are row-normalised (each true or reference class sums to 1), as in the "
            "paper's Face++ confusions; a class a reader never saw in training has an empty column.")
    return "".join(parts) + _note(note)


def _attribute(name: str, entry: Mapping[str, Any], heatmap_duration: str) -> str:
    """Accuracy table for every duration; confusion heatmaps for `heatmap_duration` only."""
    rows = []
    for label, agreement in entry["durations"].items():
        rows += [[_e(label), _e(AGREEMENTS[k]), _pct(agreement[k]["accuracy"]), str(agreement[k]["n"])]
                 for k in AGREEMENTS if k in agreement]
    caption = f"{name}: agreement (probe trained on {entry.get('n_train', '?')} faces)"
    shown = entry["durations"][heatmap_duration]
    heatmaps = _confusions(f"{name}, {heatmap_duration} input", shown["classes"],
                           {k: shown[k] for k in AGREEMENTS if k in shown})
    return _table(["input", "comparison", "accuracy %", "n"], rows, caption) + heatmaps


def _confusions(title: str, classes: Sequence[str], agreements: Mapping[str, Mapping]) -> str:
    plt = _pyplot()
    size = 1.2 + 0.45 * len(classes)
    fig, axes = plt.subplots(1, len(agreements), figsize=(size * len(agreements), size), squeeze=False,
                             layout="constrained")
    for ax, (kind, agreement) in zip(axes[0], agreements.items()):
        matrix = np.asarray(agreement["row_normalised"])  # (C, C)
        ax.imshow(matrix, vmin=0, vmax=1, cmap="Blues")
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if value > 0.6 else "black")
        rows_are, cols_are = kind.split("_vs_")
        ax.set(title=AGREEMENTS[kind], xlabel=cols_are, ylabel=rows_are,
               xticks=range(len(classes)), yticks=range(len(classes)))
        ax.set_xticklabels(classes, rotation=45, ha="right", fontsize=7)
        ax.set_yticklabels(classes, fontsize=7)
        ax.title.set_fontsize(8)
    fig.suptitle(title, fontsize=9)
    return _figure(fig)


def groups(metrics: Mapping[str, Any]) -> str:
    parts = []
    for label, by_attribute in metrics["groups"].items():
        for attribute, per_value in sorted(by_attribute.items()):
            recalls = [f"recall@{k}" for k in _ks(per_value)]
            names = sorted(per_value["angle"])
            rows = [[_e(group), str(per_value["angle"][group][1]),
                     *[_pct(per_value[r][group][0]) + _ci(per_value[r][group][2]) for r in recalls],
                     f"{per_value['angle'][group][0]:.2f}"] for group in names]
            head = ["group", "n", *[r.replace("recall@", "R@") + " %" for r in recalls], "angle (deg)"]
            parts.append(_table(head, rows, f"{label} input, by {attribute} (cosine retrieval)"))
    if not parts:
        return _note("The samples carry no group attributes (gender, age, origin): nothing to break down.")
    note = ("Recall within each group still counts the whole gallery as candidates; small groups have "
            "wide intervals. A group labelled unknown has no ground truth.")
    return "".join(parts) + _note(note)


def grids(grid: Mapping[str, Any] | None) -> str:
    if grid is None:
        return _note("No retrieval examples were given to the report.")
    if not grid["rows"]:
        return _note("The shards carry no face.jpg: no examples to show.")
    rows = []
    for row in grid["rows"]:
        cells = [_face(face, "true face" if i == 0 else f"#{i}") for i, face in enumerate(row["faces"])]
        rows.append(cells)
    head = ["true face", *[f"retrieved #{i}" for i in range(1, len(grid["rows"][0]["faces"]))]]
    note = (f"{grid['duration']} input, cosine. Each row: a query's true face, then the {len(head) - 1} "
            "gallery faces closest to its v_s; the true face has a green frame wherever it appears.")
    return f'<div class="grid">{_table(head, rows)}</div>' + _note(note)


def _face(face: Mapping[str, Any], caption: str) -> str:
    mark = " ✓" if face["true"] else ""
    if face["jpeg"] is None:
        return f"{_e(face['key'])}<br>(no face.jpg){mark}"
    css = ' class="true"' if face["true"] else ""
    src = _data_uri(face["jpeg"], "image/jpeg")
    return f'<img{css} src="{src}" alt="{_e(face["key"])}" title="{_e(face["key"])}"><br>{_e(caption)}{mark}'


FACE_SETS_NOTE = (
    "F2F = decoder(v_f): the canonical face decoded from the true face's feature, the upper bound of "
    "what the decoder keeps. S2F = decoder(v_s): the canonical face decoded from the voice's predicted "
    "feature. Each decoded face is enlarged for dlib, detected (HOG), given 68 landmarks, aligned as the "
    "shard builder aligns face.jpg and read by the teacher.")


def decoded_faces(faces: Mapping[str, Any] | None, grid: Mapping[str, Any] | None) -> str:
    if faces is None:
        return _note("Run with --decoder DECODER_CKPT to decode F2F and S2F faces and measure them.")
    sets = {"F2F": faces["f2f"], **{f"S2F {label}": entry for label, entry in faces["s2f"].items()}}
    parts = [_note(FACE_SETS_NOTE + f" Decoder <code>{_e(faces['decoder'])}</code>, "
                   f"{faces['image_size']} px faces, {faces['items']} clips."),
             _detection_table(sets)]
    if "retrieval_skipped" in faces:
        parts.append(_note(f"Retrieval of decoded faces not run: {_e(faces['retrieval_skipped'])}"))
    else:
        parts += [_decoded_retrieval_table(sets, "retrieval", "the clip's own true face"),
                  _decoded_retrieval_table(sets, "identity_retrieval", "any true face of the speaker")]
    parts.append(_correlation_table(faces["f2f"]["drawn_vs_read"], "measurement",
                                    "F2F: the geometry the decoder drew (its landmark output) vs dlib's "
                                    "reading of the image; a low r means the measurement reads the reader"))
    for label, entry in faces["s2f"].items():
        parts.append(_correlation_table(entry["craniofacial"], "measurement",
                                        f"Craniofacial: F2F vs S2F {label}, Pearson r over clips with a face on both"))
    for name, entry in sets.items():
        if "true_geometry" in entry:
            parts.append(_correlation_table(entry["true_geometry"], "true field ~ measurement",
                                            f"True face geometry vs measurements on {name}"))
    if "true_geometry_drawn" in faces["f2f"]:
        parts.append(_correlation_table(faces["f2f"]["true_geometry_drawn"], "true field ~ measurement",
                                        "True face geometry vs measurements on the landmarks the decoder "
                                        "drew F2F with"))
    parts += _reference_tables(faces.get("reference"))
    parts.append(_note("Lengths are in interocular distances (s2f.craniofacial); a true field '<width>/IOD' "
                       "is that width in the same unit. The interval of r resamples whole speakers: their "
                       "clips share one face, so it is wider than p, which counts clips as independent, "
                       "suggests. The random-pair baseline correlates the same measurements with the "
                       "pairing shuffled: mean ± std of r and the permutation p of the observed |r|. "
                       "Faces dlib missed are left out (n)."))
    return "".join(parts) + _face_grid(grid)


def _reference_tables(reference: Mapping[str, Any] | None) -> list[str]:
    """The true faces shrunk to the decoded size and read as decoded faces: the reading's ceiling."""
    if reference is None:
        return []
    size, found = reference["image_size"], reference["detection"]
    name = f"the true faces at {size} px"
    parts = [_note(f"Reference: each clip's true target face (portrait.jpg, else face.jpg) shrunk to {size} px "
                   f"as the decoder's targets are, read as decoded faces are; dlib found {found['detected']} "
                   f"of {found['n']}. A decoder that drew every true face exactly would score its "
                   "true-geometry r: judge F2F against it.")]
    parts.append(_correlation_table(reference["f2f_vs_reference"], "measurement",
                                    f"F2F vs {name}, Pearson r over clips with a face on both"))
    if "true_geometry" in reference:
        parts.append(_correlation_table(reference["true_geometry"], "true field ~ measurement",
                                        f"True face geometry vs measurements on {name}"))
    return parts


def _detection_table(sets: Mapping[str, Mapping[str, Any]]) -> str:
    rows = [[_e(name), str(d["detected"]), str(d["n"]), _pct(d["rate"]) + _ci(d["ci"])]
            for name, d in ((name, entry["detection"]) for name, entry in sets.items())]
    return _table(["faces", "detected", "of", "rate % [95% Wilson]"], rows, "dlib finds a face")


def _decoded_retrieval_table(sets: Mapping[str, Mapping[str, Any]], key: str, match: str) -> str:
    first = next(iter(sets.values()))[key]
    ks = _ks(first["chance"])
    rows = [[_e(name), _e(metric), *[_value(entry[key][metric][f"recall@{k}"]) for k in ks],
             *[_times(entry[key]["chance_ratio"][metric].get(f"recall@{k}")) for k in ks]]
            for name, entry in sets.items() for metric in METRICS]
    rows.append(["chance", "", *[_pct(first["chance"][f"recall@{k}"]) for k in ks], *["1.0"] * len(ks)])
    head = ["faces", "metric", *[f"R@{k} %" for k in ks], *[f"R@{k} / chance" for k in ks]]
    caption = (f"Decoded face's descriptor as query, a hit is {match}; gallery of {first['gallery_size']} "
               "true-face features [95% bootstrap CI]; a face dlib missed ranks last")
    return _table(head, rows, caption)


def _times(ratio: float | None) -> str:
    return "–" if ratio is None else f"{ratio:.1f}"


def _number(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


def _correlation_table(table: Mapping[str, Mapping[str, Any]], first: str, caption: str) -> str:
    rows = []
    for name, row in table.items():
        base = row.get("baseline")
        random_pair = "–" if base is None else f"{base['mean']:+.3f} ± {base['std']:.3f}"
        rows.append([_e(name), "–" if row["r"] is None else f"{row['r']:+.3f}", _r_interval(row.get("ci")),
                     _number(row["p"]), str(row["n"]), random_pair,
                     _number(None if base is None else base["p_value"])])
    head = [first, "r", "r: 95% CI over speakers", "p", "n", "random-pair r", "permutation p"]
    return _table(head, rows, caption)


def _r_interval(ci: Sequence[float] | None) -> str:
    return "–" if ci is None else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"


def _face_row(row: Mapping[str, Any], portraits: bool) -> list[str]:
    key = row["key"]
    cells = [_picture(row["true"], "image/jpeg", key) + "<br>true face"]
    if portraits:
        cells.append(_picture(row.get("portrait"), "image/jpeg", key, "portrait.jpg") + "<br>portrait")
    cells.append(_picture(row["f2f"], "image/png", key) + f"<br>F2F{_missed(row['f2f_detected'])}")
    cells.append(_picture(row["s2f"], "image/png", key) + f"<br>S2F{_missed(row['s2f_detected'])}")
    return cells


def _face_grid(grid: Mapping[str, Any] | None) -> str:
    if grid is None:
        return ""
    portraits = any(row.get("portrait") is not None for row in grid["rows"])
    rows = [_face_row(row, portraits) for row in grid["rows"]]
    shown = "the shard's face crop, the speaker's portrait" if portraits else "the shard's face crop"
    note = (f"A seeded sample of test clips: {shown}, F2F, and S2F from {grid['duration']} of audio. "
            "\"no face\" marks a decoded face dlib does not detect.")
    head = ["true face", *(["portrait"] if portraits else []), "F2F", "S2F"]
    return f'<div class="faces">{_table(head, rows)}</div>' + _note(note)


def _picture(data: bytes | None, mime: str, key: str, member: str = "face.jpg") -> str:
    if data is None:
        return f"{_e(key)}<br>(no {member})"
    return f'<img src="{_data_uri(data, mime)}" alt="{_e(key)}" title="{_e(key)}">'


def _missed(detected: bool) -> str:
    return "" if detected else " (no face)"


def tsne(embedding: Mapping[str, Any]) -> str:
    points = np.asarray(embedding["v_s"], dtype=np.float64)  # (P, D)
    if len(points) < 5:
        return _note(f"{len(points)} clips: too few for a t-SNE.")
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        return _note("t-SNE needs scikit-learn: pip install scikit-learn, then run the evaluation again.")
    perplexity = min(TSNE_PERPLEXITY, (len(points) - 1) / 3)  # sklearn needs perplexity < P
    method = "exact" if len(points) <= TSNE_EXACT_MAX else "barnes_hut"
    tsne_2d = TSNE(n_components=2, perplexity=perplexity, init="pca", method=method, random_state=TSNE_SEED)
    xy = tsne_2d.fit_transform(points)  # (P, 2)
    labels = {name: values for name, values in embedding["labels"].items() if any(v is not None for v in values)}
    figure = _scatter(xy, labels or {"clips": ["all"] * len(xy)})
    colours = "coloured by each known attribute" if labels else "no attributes known to colour by"
    note = f"v_s of {len(points)} clips ({embedding['duration']} input), {colours}."
    return figure + _note(note)


def _scatter(xy: np.ndarray, labels: Mapping[str, Sequence]) -> str:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(labels), figsize=(4 * len(labels), 4), squeeze=False)
    for ax, (name, values) in zip(axes[0], labels.items()):
        names = np.array(["unknown" if v is None else str(v) for v in values])
        for group in sorted(set(names)):
            member = names == group
            ax.scatter(xy[member, 0], xy[member, 1], s=8, label=group)
        ax.set(title=name, xticks=[], yticks=[])
        ax.legend(fontsize=7, markerscale=2)
    return _figure(fig)


def ethics(metrics: Mapping[str, Any]) -> str:
    spread = []
    for attribute, per_value in sorted(metrics["groups"].get(_longest(metrics), {}).items()):
        recall = per_value.get("recall@10", {})
        if len(recall) > 1:
            low, high = min(recall.items(), key=lambda g: g[1][0]), max(recall.items(), key=lambda g: g[1][0])
            spread.append(f"by {_e(attribute)}, R@10 ranges from {_pct(low[1][0])} % ({_e(low[0])}) "
                          f"to {_pct(high[1][0])} % ({_e(high[0])})")
    text = [
        "A voice carries traits that many people share: gender, age, cues of origin and some face "
        "shape. Speech2Face recovers such group-level traits; it does not recover a person's "
        "identity, and the faces it predicts are average-looking faces of the group. Retrieval above "
        "chance means the predicted feature points to faces of people with similar traits, not to "
        "the speaker.",
        "Results differ between groups, and degrade for languages and groups that are rare in the "
        "training data; children's high voices tend to read as female. See the per-group tables"
        + (": " + "; ".join(spread) + "." if spread else "."),
        "Do not use predictions to identify, profile or make decisions about individuals.",
    ]
    return "".join(f"<p>{t}</p>" for t in text)


# ----------------------------------------------------------------------------- the page


def render_report(metrics: Mapping[str, Any], media: Mapping[str, Any], out_path: str | Path) -> Path:
    """Write the HTML report of `metrics` (metrics.json content) and `media` to `out_path`."""
    bodies = {
        "summary": summary(metrics),
        "similarity": similarity(metrics, media.get("angles", {})),
        "retrieval": retrieval(metrics),
        "identity": identity(metrics),
        "matching": matching(metrics),
        "attributes": attributes(metrics),
        "groups": groups(metrics),
        "grids": grids(media.get("grid")),
        "faces": decoded_faces(metrics.get("faces"), media.get("faces")),
        "tsne": tsne(media["embedding"]) if "embedding" in media else _note("No features were given."),
        "ethics": ethics(metrics),
    }
    sections = "".join(
        f'<section id="{name}"><h2>{_e(SECTIONS[name])}</h2>{body}</section>' for name, body in bodies.items()
    )
    nav = " · ".join(f'<a href="#{name}">{_e(title)}</a>' for name, title in SECTIONS.items())
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>s2f evaluation</title>'
            f"<style>{STYLE}</style></head><body><h1>s2f evaluation</h1><nav>{nav}</nav>{sections}</body></html>\n")
    path = Path(out_path)
    path.write_text(page, encoding="utf-8")
    return path
