"""The main job's report: WORKDIR/report.md from every stage's figures.

`write(final, workdir)` renders the tables (stage times, reward-model
accuracy in and out of domain, oracle alignment of SFT vs ReFL vs ReFL with
inference-time search per category, ReFL's reward and hacking diagnostics,
video alignment) and links the pictures the stages saved (reward and
oracle curves, oracle vs NFE, sample grids before / after ReFL, video
strips). Pictures are linked by paths relative to WORKDIR, so the report
renders wherever the workdir is copied.

`python -m rd_jax.report DIR [DIR ...]` prints a Markdown table of train_rm
runs (`rm_runs`: a row a workdir, from its final_metrics.json and
config.json, then their mean and standard deviation, and how many reach the
issue's target), for seed sweeps and ablations.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

from rd_jax import train_util
from rd_jax.data import world


def table(header: list[str], rows: list[list]) -> str:
  """A Markdown table; floats with 3 decimals, missing values as '–'."""
  def cell(v):
    if v is None:
      return "–"
    return f"{v:.3f}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(header) + " |",
           "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
  return "\n".join(lines)


def _picture(workdir: str, rel: str, alt: str) -> str:
  if not os.path.exists(os.path.join(workdir, rel)):
    return f"({alt}: `{rel}` was not written)"
  return f"![{alt}]({rel})"


def _best(curves: list[dict], mode: str) -> dict | None:
  """The row of `mode` with the most generator evaluations."""
  rows = [c for c in curves if c["mode"] == mode]
  return max(rows, key=lambda c: c["nfe_generator"]) if rows else None


def _label(row: dict) -> str:
  if row["mode"] == "best_of_n":
    return f"Best-of-{row['n']}"
  if row["mode"] == "search_over_paths":
    return f"search over paths (n={row['n']}, m={row['m']})"
  return f"plain, {row['steps']} steps"


def summary(final: dict) -> dict:
  """The headline figures (printed by the main job)."""
  out = {"oracle_selfcheck_pass": final["selfcheck"]["pass"]}
  g, rm, rf = (final.get(k, {}) for k in ("generator", "reward_model",
                                           "refl"))
  out.update({k: g.get(k) for k in ("oracle_t2i", "oracle_t2v",
                                    "oracle_i2v")})
  out.update({f"rm_{k}": rm.get(k) for k in ("acc_id", "acc_ood")})
  out.update({k: rf.get(k) for k in ("oracle_before", "oracle_after")})
  curves = final.get("search", {}).get("curves", [])
  best = max(curves, key=lambda c: c["oracle"], default=None)
  if best:
    out["search_best"] = {"mode": _label(best), "oracle": best["oracle"]}
  out["report"] = final.get("report", {}).get("path")
  out["wall_s"] = final.get("wall_s")
  return out


def write(final: dict, config, workdir: str) -> str:
  """Writes WORKDIR/report.md; returns its path."""
  path = os.path.join(workdir, "report.md")
  parts = ["# RewardDance on ShapesWorld: report", ""]
  sc = final["selfcheck"]
  parts += [
      f"Workdir `{os.path.abspath(workdir)}`; config in `config.json`, "
      "every figure in `final_metrics.json` and `stages/*.json`. The oracle "
      "(a pixel judge, rd_jax/data/oracle.py) "
      f"{'passed' if sc['pass'] else 'FAILED'} its self-check (min clean "
      f"accuracy {sc['min_clean_accuracy']:.3f}, min semantic rejection "
      f"{sc['min_semantic_rejection']:.3f}).", ""]

  done = {k: v["stage_wall_s"] for k, v in final.items()
          if isinstance(v, dict) and "stage_wall_s" in v}
  parts += ["## Stages", "",
            table(["stage", "wall time", "workdir"],
                  [[k, train_util.fmt_time(t),
                    f"`{k}/`" if os.path.isdir(os.path.join(workdir, k))
                    else "–"] for k, t in done.items()] +
                  [["all before the report", train_util.fmt_time(
                      sum(done.values())), ""]]), ""]

  rms = [(k, final[k]) for k in ("reward_model", "verifier") if k in final]
  if rms:
    parts += ["## Reward models (preference accuracy, held-out pairs)", "",
              table(["stage", "paradigm", "params", "steps", "acc_id",
                     "acc_ood", "ece_id", "position consistency id",
                     "position consistency ood"],
                    [[k, m["paradigm"], m["params"], m["steps"],
                      m.get("acc_id"), m.get("acc_ood"), m.get("ece"),
                      m.get("position_consistency"),
                      m.get("position_consistency_ood")]
                     for k, m in rms]), ""]
    failures = sorted(set().union(*(m.get("acc_by_failure", {})
                                    for _, m in rms)))
    parts += ["Accuracy per failure mode (test_id):", "",
              table(["failure"] + [k for k, _ in rms],
                    [[f] + [m.get("acc_by_failure", {}).get(f)
                            for _, m in rms] for f in failures]), ""]

  rf = final.get("refl")
  curves = final.get("search", {}).get("curves", [])
  if rf:
    cols = [("SFT", rf["oracle_by_category_before"]),
            ("ReFL", rf["oracle_by_category_after"])]
    for mode in ("best_of_n", "search_over_paths"):
      row = _best(curves, mode)
      if row:
        cols.append((f"ReFL + {_label(row)}", row["by_category"]))
    parts += [
        "## Oracle alignment on held-out T2I prompts", "",
        table(["category"] + [c for c, _ in cols],
              [[cat] + [v.get(cat) for _, v in cols]
               for cat in (*world.IMAGE_CATEGORIES, "overall")]), "",
        f"{config.refl.final_eval_n} held-out (test_id) prompts. SFT and "
        "ReFL: the refl stage's evaluation before and after its "
        f"{config.refl.train.steps} steps (EMA params, plain sampling); the "
        "search columns sample the same prompts with the ReFL generator and "
        "the verifier.", ""]
    rewards = rf["reward_mean_curve"]
    stds = rf["reward_std_window_curve"]
    parts += [
        "## ReFL: reward and reward hacking", "",
        table(["figure", "first step", "last step"],
              [[f"reward mean ({rf['paradigm']})", rewards[0], rewards[-1]],
               ["reward std over the sliding window", stds[0], stds[-1]],
               [f"its peak: {max(stds):.3f} at step "
                f"{stds.index(max(stds)) + 1}", None, None],
               ["oracle alignment (held-out)", rf["oracle_before"],
                rf["oracle_after"]],
               ["sample diversity (pixel std across seeds)",
                rf["diversity_before"], rf["diversity_after"]]]), "",
        "Reward up while the oracle stays flat or falls is reward hacking "
        "(DESIGN.md §2.6).", "",
        _picture(workdir, "refl/reward_and_oracle.png",
                 "reward mean, its window std, and the oracle over ReFL "
                 "steps"), "",
        "Samples on held-out prompts before (SFT) and after ReFL:", "",
        _picture(workdir, "refl/samples_before.png", "before ReFL"), " ",
        _picture(workdir, "refl/samples_after.png", "after ReFL"), ""]

  if curves:
    parts += [
        "## Inference-time scaling (ReFL generator, pointwise verifier)", "",
        table(["mode", "generator NFE / prompt", "verifier calls / prompt",
               "oracle"],
              [[_label(c), c["nfe_generator"], c["nfe_verifier"],
                c["oracle"]] for c in curves]), "",
        _picture(workdir, "search/oracle_vs_nfe.png", "oracle vs NFE"), ""]

  g = final.get("generator")
  if g:
    by = g.get("oracle_by_category", {})
    video = [t for t in ("t2v", "i2v") if t in by]
    if video:
      cats = sorted({c for t in video for c in by[t]} - {"overall"})
      parts += [
          "## Video (SFT generator, held-out motion prompts)", "",
          table(["category"] + video,
                [[c] + [by[t].get(c) for t in video]
                 for c in (*cats, "overall")] +
                # oracle.motion: objects followed, then moving as asked.
                [[f"motion: {k}"] + [g.get(f"oracle_motion_{t}", {}).get(k)
                                     for t in video]
                 for k in ("tracked", "moving", "direction", "speed")]), "",
          _picture(workdir, "generator/video/samples_t2v_frames.png",
                   "text-to-video frame strips"), "",
          _picture(workdir, "generator/video/samples_i2v_frames.png",
                   "image-to-video frame strips (first frame given)"), ""]
  with open(path + ".tmp", "w") as f:
    f.write("\n".join(parts))
  os.replace(path + ".tmp", path)
  return path


RM_COLUMNS = ("acc_id", "acc_ood", "acc_sym_id", "acc_sym_ood",
              "position_consistency", "wall_s")


def rm_runs(workdirs: list[str], min_acc_id: float = 0.90,
            min_acc_ood: float = 0.80) -> str:
  """A Markdown table of train_rm workdirs: seed, RM_COLUMNS and the
  test_id accuracy per failure, then mean and std (ddof 1) over the runs,
  and the count with acc_id >= min_acc_id and acc_ood >= min_acc_ood."""
  runs = []
  for d in workdirs:
    path = os.path.join(d, "final_metrics.json")
    if not os.path.exists(path):
      raise FileNotFoundError(
          f"no final_metrics.json in {d!r}: not a finished train_rm workdir "
          "(a run writes it after its final evaluation)")
    with open(path) as f:
      m = json.load(f)
    seed = train_util.load_config(d, "name train_rm workdirs").get("seed")
    runs.append((d, seed, m))
  failures = [f for f in world.FAILURES
              if any(f in m.get("acc_by_failure", {}) for *_, m in runs)]
  rows = [[f"`{d}`", seed] + [m.get(k) for k in RM_COLUMNS] +
          [m.get("acc_by_failure", {}).get(f) for f in failures]
          for d, seed, m in runs]

  stats = []
  if len(runs) > 1:  # over the runs, in the columns every run has
    cols = [np.array(c, float) if all(isinstance(x, (int, float)) for x in c)
            else None for c in list(zip(*rows))[2:]]
    stats = [["mean", None] + [c if c is None else c.mean() for c in cols],
             ["std", None] + [c if c is None else c.std(ddof=1)
                              for c in cols]]
  met = sum(1 for *_, m in runs
            if (m.get("acc_id") or 0) >= min_acc_id
            and (m.get("acc_ood") or 0) >= min_acc_ood)
  return "\n".join([
      table(["run", "seed", *RM_COLUMNS, *failures], rows + stats), "",
      f"{met} of {len(runs)} runs reach acc_id >= {min_acc_id:g} and "
      f"acc_ood >= {min_acc_ood:g}."])


if __name__ == "__main__":
  if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
    sys.exit("usage: python -m rd_jax.report TRAIN_RM_WORKDIR [...]")
  print(rm_runs(sys.argv[1:]))
