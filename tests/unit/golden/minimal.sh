#!/bin/bash
#SBATCH --job-name=qe-prod-llama-70b
#SBATCH --comment=queue-engine:prod:llama-70b
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=4
#SBATCH --gres=gpu:1
#SBATCH --mem=16G
#SBATCH --time=04:00:00
#SBATCH --output=/srv/queue-engine/slurm/%x-%j.out
#SBATCH --signal=B:TERM@300

# A queue-engine worker for model llama-70b (deployment prod),
# rendered by `queue-engine slurm-script --model llama-70b`.
# SIGTERM (the walltime signal above, or `scancel --batch --signal=TERM`) is a
# warm shutdown: the worker stops taking work, finishes what it holds, exits.
set -eo pipefail
# Celery's process title ("[celeryd: ...") puts a space in the command name,
# which SLURM's proctrack/linuxproc cannot parse: the worker would never get
# SLURM's signals (scancel, the end of the walltime). Keep the plain name.
export NOSETPS=1

exec queue-engine worker --model llama-70b
