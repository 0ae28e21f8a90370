"""delt: the orchestration layer of delt-ext (data, teachers, selection, synthesis, evaluation).

Data flows one way: a dataset and a teacher go in, a distilled set and its manifest come out,
an evaluation reads them. The modules form floors, lowest first; a module imports only modules
of lower floors or ones listed before it on its own floor, never another module's private names
(``tests/test_layering.py`` checks it). :mod:`delt_ext` sits below all of them and never imports
``delt``.

    config, io, runtime     flags from dataclasses; atomic files; devices, seeds, logging
      distributed           torchrun: the process group, rank 0's writes, barriers, rank logs
    data                    dataset registry, DatasetInfo, DataMismatchError
    models                  model registry, checkpoints, TeacherMismatchError
    schedules               pure schedules: EarlyLate, chunks, LR, crop curriculum, stages
    distilled               the distilled-set format: Manifest, save/load/check, stage unions
    student                 the training engine: batches, accuracy, StudentTrainer, CutMix
    teacher, select         `delt teacher`, `delt select`
    synthesis               method recipes, prepare_run, the chunk loop, the output writer
    pdd, recover            `delt recover --method pdd` (and its options); `delt recover`
    evaluate, stagewise,    `delt eval` (`--stagewise`), `delt diversity`
      diversity
    report, distill         reports and charts; `delt distill`
    demo, cli               `delt demo`; the command table
"""

# The declared order (floors, lowest first), read by tests/test_layering.py.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("config", "io", "runtime", "distributed"),
    ("data",),
    ("models",),
    ("schedules",),
    ("distilled",),
    ("student",),
    ("teacher", "select"),
    ("synthesis",),
    ("pdd", "recover"),
    ("evaluate", "stagewise", "diversity"),
    ("report", "distill"),
    ("demo", "cli"),
)
