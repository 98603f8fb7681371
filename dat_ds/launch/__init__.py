"""Starting dat-ds jobs on clusters: :mod:`.slurm` turns a Slurm allocation into the command that
starts one ``torchrun`` agent per node (``recipes/slurm/dat.sbatch`` calls it)."""
