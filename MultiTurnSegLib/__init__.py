"""MultiTurnSeg library: multi-turn MediRound segmentation without Slicer.

Sub-packages, one concern each:
  imaging          volumes to 2D slices (8-bit RGB) and masks back to 3D
  conversation     turns, references between rounds, JSON form, turn runner
  segmentation_io  .seg.nrrd read/write (Slicer-compatible)
  engine           the MediRound model (torch): loading, exact inference, sessions
  backends         one Backend interface: local (engine in-process) or remote (worker client)
  worker           the FastAPI inference service and its wire protocol
  export           DICOM-SEG and terminology codes
  cli              the ``multiturnseg`` command

Importing this package imports neither torch nor Slicer.
"""

__version__ = "0.1.0"
