#!/bin/bash
#SBATCH --job-name=qe-prod-llama-70b
#SBATCH --comment=queue-engine:prod:llama-70b
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --gres=gpu:2
#SBATCH --mem=64G
#SBATCH --time=1-00:00:00
#SBATCH --partition=gpu
#SBATCH --account=proj-42
#SBATCH --qos=normal
#SBATCH --constraint=a100&ib
#SBATCH --output=/shared/qe/logs/%x-%j.out
#SBATCH --signal=B:TERM@600
#SBATCH --exclusive
#SBATCH --mail-user=ops@example.org

# A queue-engine worker for model llama-70b (deployment prod),
# rendered by `queue-engine slurm-script --model llama-70b`.
# SIGTERM (the walltime signal above, or `scancel --batch --signal=TERM`) is a
# warm shutdown: the worker stops taking work, finishes what it holds, exits.
set -eo pipefail
# Celery's process title ("[celeryd: ...") puts a space in the command name,
# which SLURM's proctrack/linuxproc cannot parse: the worker would never get
# SLURM's signals (scancel, the end of the walltime). Keep the plain name.
export NOSETPS=1
module load cuda/12.4
source /shared/qe/venv/bin/activate
export VLLM_WORKER_MULTIPROC_METHOD=spawn

exec queue-engine worker --model llama-70b
