"""The evaluation job: checkpoints + test pairs + the searched mask -> the paper's Tables 1-5.

Utility is face verification (cosine, 10 folds) of every model under each desensitization;
privacy is image quality (dSSIM, PSNR) of the desensitized and the restored images, and
re-identification of the training identities by dlib and the recipient models (`audit`). The test
pairs are the held-out identities of the checkpoints' own split (identity-disjoint from
training), or LFW pairs. Output folder:

  results.json   every number, the settings, the command line, device and versions
  report.md      one Markdown table per paper table, with the paper's numbers beside ours
  examples.png   original / masked / blur / mosaic / restored test faces (Figs. 5 and 7)
  levels.png     one random mask per hole-ratio level and a face under it (Fig. 4)
  baseline.png   the Section 4.2 baseline masks, a face under them and its inpainting (Fig. 5)
  privacy_utility.png  per desensitization, worst re-identification against best verification

A model's role comes from its run.json (`model` = resnet / mask / fsm). An FSM model embeds a
masked image with its FSM branch fed the same mask, and a clean (or restored, blurred,
pixelated) image with no mask, which is exactly its plain backbone (FS = 1).

One module per reason to change: `settings` (the flags), `sets` (what is tested on and which
checkpoints may share it), `tables` (utility: verification, Tables 1, 2, 5), `quality` (privacy:
Table 4, restoration attacks), `audit` (privacy: who can name the people), `report` (Markdown),
`figures`, `run` (the job end to end).
"""

from jaxdesens.jobs.evaluate.run import run_evaluate_job
from jaxdesens.jobs.evaluate.settings import EvaluateJob

__all__ = ["EvaluateJob", "run_evaluate_job"]
