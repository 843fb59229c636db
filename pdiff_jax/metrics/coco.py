"""BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE when it can run) through pycocoevalcap's own scorers.

The scorers are called directly rather than through `COCOEvalCap.evaluate`, which builds SPICE and
so dies offline. pycocoevalcap writes temporary files next to its own modules (tokenizer, SPICE);
to work when site-packages is read-only, those two modules run from a private mirror of the
package (copied .py files, symlinked jars) in a temporary directory.
"""

from __future__ import annotations

import atexit
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Callable, Hashable, Mapping, Sequence

_MIRROR: str | None = None
MIRROR_PACKAGE = "pdiff_pycocoevalcap_rw"
CORENLP_JAR = "stanford-corenlp-3.6.0.jar"


class MetricError(RuntimeError):
  pass


def _package_dir() -> str:
  import pycocoevalcap.bleu.bleu as bleu
  return os.path.dirname(os.path.dirname(os.path.abspath(bleu.__file__)))


def _mirror() -> str:
  """A writable copy of the parts of pycocoevalcap that write next to themselves."""
  global _MIRROR
  if _MIRROR is None:
    src = _package_dir()
    root = tempfile.mkdtemp(prefix="pdiff_pycocoevalcap_")
    atexit.register(shutil.rmtree, root, True)
    pkg = os.path.join(root, MIRROR_PACKAGE)
    for sub in ("tokenizer", "spice", os.path.join("spice", "lib")):
      os.makedirs(os.path.join(pkg, sub), exist_ok=True)
    open(os.path.join(pkg, "__init__.py"), "w").close()
    open(os.path.join(pkg, "tokenizer", "__init__.py"), "w").close()
    for sub in ("tokenizer", "spice", os.path.join("spice", "lib")):
      for name in os.listdir(os.path.join(src, sub)):
        path = os.path.join(src, sub, name)
        if os.path.isdir(path) or name == "__pycache__":
          continue
        target = os.path.join(pkg, sub, name)
        if name.endswith(".py"):
          shutil.copyfile(path, target)
        else:
          os.symlink(path, target)
    sys.path.insert(0, root)
    _MIRROR = pkg
  return _MIRROR


def _java() -> str:
  java = shutil.which("java")
  if java is None:
    raise MetricError("Java is needed for the PTB tokenizer and METEOR (pycocoevalcap) but "
                      "`java` is not on PATH; install a JRE (e.g. apt-get install default-jre)")
  return java


def tokenize(captions: Mapping[Hashable, Sequence[str]]) -> dict:
  """pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1), run from the writable mirror."""
  _java()
  _mirror()
  ptb = importlib.import_module(f"{MIRROR_PACKAGE}.tokenizer.ptbtokenizer")
  return ptb.PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})


def spice_unavailable_reason() -> str | None:
  lib = os.path.join(_package_dir(), "spice", "lib")
  if not os.path.exists(os.path.join(lib, CORENLP_JAR)):
    return (f"SPICE needs Stanford CoreNLP 3.6.0 ({CORENLP_JAR} and its models jar in {lib}), "
            "which pycocoevalcap downloads at first use; it is not there and cannot be fetched here")
  return None


def _spice(gts: dict, res: dict) -> float:
  _mirror()
  spice = importlib.import_module(f"{MIRROR_PACKAGE}.spice.spice")
  score, _ = spice.Spice().compute_score(gts, res)
  return float(score)


def coco_scores(references: Mapping[Hashable, Sequence[str]], candidates: Mapping[Hashable, str],
                spice: bool = True, meteor: bool = True) -> dict:
  """Corpus scores on pycocoevalcap's scale (CIDEr 1.13 = "113.0" in papers), one call for
  the whole split (CIDEr's IDF comes from these references). SPICE is None when it cannot run,
  with the reason under "SPICE_unavailable_reason"; `meteor=False` leaves METEOR out (its Java
  process loads for seconds)."""
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  from pycocoevalcap.meteor.meteor import Meteor
  from pycocoevalcap.rouge.rouge import Rouge

  if set(references) != set(candidates):
    raise MetricError("references and candidates must cover the same images")
  if not candidates:
    raise MetricError("no captions to score")
  gts = tokenize(references)
  res = tokenize({k: [c] for k, c in candidates.items()})
  out: dict = {}
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  out.update({f"BLEU-{i + 1}": float(b) for i, b in enumerate(bleu)})
  if meteor:
    scorer = Meteor()
    try:
      out["METEOR"] = float(scorer.compute_score(gts, res)[0])
    finally:
      _close_meteor(scorer)
  out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
  out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
  out["SPICE"] = None
  reason = spice_unavailable_reason() if spice else "not requested"
  if reason is None:
    try:
      out["SPICE"] = _spice(gts, res)
    except (OSError, subprocess.CalledProcessError, ValueError) as e:
      reason = f"SPICE failed: {type(e).__name__}: {e}"
  if out["SPICE"] is None:
    out["SPICE_unavailable_reason"] = reason
  return out


def cider(candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> float:
  """CIDEr alone (PTB-tokenised), for sweeps that need nothing else."""
  return cider_against(references)(candidates)


def cider_against(references: Mapping[Hashable, Sequence[str]]) -> Callable[[Mapping[Hashable, str]], float]:
  """`cider(candidates, references)` as a function of the candidates, for scoring many sets of
  candidates against the same references (an eval sweep scores ~15): the references are
  PTB-tokenised once, so each set costs one run of the Java tokenizer instead of two."""
  from pycocoevalcap.cider.cider import Cider
  gts = tokenize(references)

  def score(candidates: Mapping[Hashable, str]) -> float:
    return float(Cider().compute_score(gts, tokenize({k: [c] for k, c in candidates.items()}))[0])
  return score


def _close_meteor(meteor) -> None:
  """Stops METEOR's Java process now rather than whenever the object is collected."""
  with meteor.lock:
    meteor.meteor_p.stdin.close()
    meteor.meteor_p.kill()
    meteor.meteor_p.wait()
