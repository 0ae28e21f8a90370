"""delt: the orchestration layer of delt-ext (data, teachers, selection, synthesis, evaluation).

Data flows one way: a dataset and a teacher go in, a distilled set and its manifest come out,
an evaluation reads them. The modules form floors, lowest first; a module imports only modules
of lower floors or ones listed before it on its own floor, never another module's private names
(``tests/test_layering.py`` checks it). :mod:`delt_ext` sits below all of them and never imports
``delt``.

    config, io, runtime,    flags from dataclasses; atomic files; devices, seeds, logging;
      distributed, lock,    torchrun: the process group, rank 0's writes, barriers, rank
      identity              logs; one writer per output folder (OUT/.lock); run identities
                            (one function computes them, one checks them)
    data                    dataset registry, DatasetInfo, DataMismatchError
    batches                 a dataset's batches, a model's top-1 accuracy on it
    models                  model registry, checkpoints, TeacherMismatchError
    schedules               pure schedules: EarlyLate, chunks, LR, crop curriculum, stages
    distilled_set           the distilled-set format: Manifest, save/load/check, stage unions
    student_augment,        the student's augmentation: ShufflePatches, RandAugment (its
      student_trainer,      draws replayed), crops, CutMix; StudentTrainer, GlobalBatchNorm2d,
      stagewise_training,   the evaluation protocol; stage-wise training (U_1, U_1 ∪ U_2, …);
      soft_labels,          the soft-label store (`delt relabel`'s file, memory-mapped);
      fkd_labels,           `delt import-labels` (SRe2L/CDA FKD folders into a store, replayed);
      protocols             evaluation protocols as named presets (delt, rded, sre2l, edc, …)
    teacher, select,        `delt teacher` (and `--import`), `delt select`, `delt import` (a
      import_released,      released set); `delt stats` (per-class BN statistics: the file,
      stats                 its collection)
    matching, teachers,     the matching target (--match: running or per-class BN
      method, chunks,       statistics); several teachers (--teachers: policies, weights,
      synthesis,            ensembles); the method registry, the options every method
      chunk_groups          shares and the components; the chunk store (resume); the chunk
                            optimizer, run setup, the output writer; K chunks per teacher step
    methods.pixels,         the pixel-optimizing method and its plain one-set recovery;
    methods.sre2l,          one module per method, each registering itself: presets of the
      methods.cda,          pixel method (sre2l, cda, delt), progressive stages (pdd), scored
      methods.delt,         real crops (rded), random real images (distill's baseline)
      methods.pdd,
      methods.rded,
      methods.random_real
    methods, recover        all built-in methods; `delt recover` (looks the method up)
    eval_results,           results files (eval.json, kept evaluations, a seed's training
      evaluate, relabel,    state); `delt eval` (`--stagewise`, `--labels`, `--protocol`),
      stagewise, diversity, `delt relabel`, `delt diversity`, `delt ddranking` (DD-Ranking's
      ddranking             scores with accuracies as fractions)
    report, comparison,     reports and charts; runs pooled by method, gains over
      compare, pipeline,    random-real paired by seed, other evaluations pooled by
      bench, bench_eval     protocol; `delt compare` (sets against random real images, per
                            student budget); `delt distill` (the whole pipeline); `delt bench
                            synthesis|eval`
    demo, cli               `delt demo`; the command table
"""

# The declared order (floors, lowest first), read by tests/test_layering.py.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("config", "io", "runtime", "distributed", "lock", "identity"),
    ("data",),
    ("batches",),
    ("models",),
    ("schedules",),
    ("distilled_set",),
    (
        "student_augment",
        "student_trainer",
        "stagewise_training",
        "soft_labels",
        "fkd_labels",
        "protocols",
    ),
    ("teacher", "select", "import_released", "stats"),
    ("matching", "teachers", "method", "chunks", "synthesis", "chunk_groups"),
    (
        "methods.pixels",
        "methods.sre2l",
        "methods.cda",
        "methods.delt",
        "methods.pdd",
        "methods.rded",
        "methods.random_real",
    ),
    ("methods", "recover"),
    ("eval_results", "evaluate", "relabel", "stagewise", "diversity", "ddranking"),
    ("report", "comparison", "compare", "pipeline", "bench", "bench_eval"),
    ("demo", "cli"),
)
