"""``finegrained launch``: a whole campaign of recipes × seeds on a SLURM cluster (or this machine) through
submitit, each job ``fit`` then ``test`` as the commands would, requeued on preemption or time limit and resumed
exactly; its records in the campaign's own folder.

* :mod:`~finegrained.launch.campaign`: the campaign folder (jobs, states, records);
* :mod:`~finegrained.launch.job`: one job (submitit ``Checkpointable``);
* :mod:`~finegrained.launch.submit`: the executors (SLURM job array, local);
* :mod:`~finegrained.launch.status`: ``launch status``.
"""
