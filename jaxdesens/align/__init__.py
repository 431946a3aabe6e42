"""Face alignment: photos of faces in, every face's eyes and nose at the same place out.

One mask serves a whole set only when every face sits in the same place (the paper's Section 3.2),
so a collection of ordinary photos is aligned first:

  geometry.py  the template (ArcFace's 112x112 frame in dlib's 5-point landmarks), the
               least-squares similarity transform, the warp
  faces.py     dlib's detectors and 5-point landmark model (the optional `faces` extra)
  folder.py    a whole identity folder, resumable, with a log of faceless and crowded photos
  check.py     does a folder look aligned? (a sample's landmark spread; the export warns)
"""
