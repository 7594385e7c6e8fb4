"""Studies: tasks x variants x seeds of `cli.py fit` + `cli.py test`, aggregated with rliable.

`python -m qt.study run STUDY.yaml` runs (or resumes) a study; `python -m qt.study report NAME`
writes its report. The study file format is described in `qt.study.spec`.
"""

from qt.study.spec import Job, Study, StudyError, load_study

__all__ = ["Job", "Study", "StudyError", "load_study"]
