#!/usr/bin/env bash
# Train on this host with DeepSpeed's launcher: one process per GPU, or NUM_GPUS CPU processes on a CPU box.
#
#   launch/train.sh RECIPE [trainer args...]
#   NUM_GPUS=2 launch/train.sh tiny --deepspeed_config ds_configs/cpu_fp32.json --set train.max_steps=10
#   DS_LAUNCHER_ARGS="--hostfile launch/hostfile --master_addr node0" launch/train.sh bert_large_wwm_squad1 ...  (multi-node)
#
# NUM_GPUS defaults to the GPUs `nvidia-smi -L` lists, else 1. Without CUDA, DeepSpeed 0.19 selects its CPU
# accelerator by itself (DS_ACCELERATOR=cpu forces it) and --num_gpus then counts CPU processes.
# --no_local_rank: ranks read LOCAL_RANK from the environment (set by the launcher) instead of a --local_rank flag.
# With --hostfile in DS_LAUNCHER_ARGS, `squad-ds hosts` checks every host first (ssh, Python and versions, shared
# data and output, MASTER_ADDR and its port) and stops on any problem; SQUAD_DS_SKIP_HOSTS_CHECK=1 skips it.
# Under SLURM use launch/slurm/train.sbatch instead: this launcher kills every rank as soon as one exits non-zero,
# so it cannot honour the checkpoint-then-exit-75 preemption contract.
set -euo pipefail

if (( $# < 1 )); then
    echo "usage: $0 RECIPE [trainer args...]" >&2
    exit 2
fi
recipe=$1
shift
# Bad input stops here with one line, before the launcher starts any rank (each would fail the same way).
die() { echo "launch/train.sh: $*" >&2; exit 2; }
if [[ $recipe == *.yaml || $recipe == *.yml ]] && [[ ! -f $recipe ]]; then
    die "recipe $recipe: no such file"
fi

if [[ -z ${NUM_GPUS:-} ]]; then
    NUM_GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    (( NUM_GPUS > 0 )) || NUM_GPUS=1
fi
[[ $NUM_GPUS =~ ^[1-9][0-9]*$ ]] || die "NUM_GPUS=$NUM_GPUS: must be a whole number of processes, at least 1"
read -ra launcher_args <<< "${DS_LAUNCHER_ARGS:-}"
master_port=${MASTER_PORT:-29500}
if ! [[ $master_port =~ ^[1-9][0-9]*$ ]] || (( master_port > 65535 )); then
    die "MASTER_PORT=$master_port: must be a port number, 1 to 65535"
fi
for (( i = 0; i < ${#launcher_args[@]}; i++ )); do
    case ${launcher_args[i]} in
        -H|--hostfile) hostfile_arg=${launcher_args[i + 1]:-} ;;
        --hostfile=*) hostfile_arg=${launcher_args[i]#*=} ;;
        *) continue ;;
    esac
    [[ -f $hostfile_arg ]] || die "hostfile ${hostfile_arg:-(none given)} (DS_LAUNCHER_ARGS): no such file"
done

if [[ ${SQUAD_DS_SKIP_HOSTS_CHECK:-0} != 1 ]]; then
    hostfile="" check_args=()
    for (( i = 0; i < ${#launcher_args[@]}; i++ )); do
        arg=${launcher_args[i]} next=${launcher_args[i + 1]:-}
        case $arg in
            -H|--hostfile) hostfile=$next ;;
            --hostfile=*) hostfile=${arg#*=} ;;
            --master_addr) check_args+=(--master-addr "$next") ;;
            --master_addr=*) check_args+=(--master-addr "${arg#*=}") ;;
            --ssh_port) check_args+=(--ssh-port "$next") ;;
            --ssh_port=*) check_args+=(--ssh-port "${arg#*=}") ;;
            --launcher) check_args+=(--launcher "$next") ;;
            --launcher=*) check_args+=(--launcher "${arg#*=}") ;;
        esac
    done
    for (( i = 1; i <= $#; i++ )); do  # the recipe overrides decide which data files and output to check
        if [[ ${!i} == --set ]]; then j=$(( i + 1 )); check_args+=(--set "${!j}"); fi
        if [[ ${!i} == --set=* ]]; then check_args+=(--set "${!i#--set=}"); fi
    done
    if [[ -n $hostfile ]]; then
        echo "launch/train.sh: checking the hosts of $hostfile (SQUAD_DS_SKIP_HOSTS_CHECK=1 skips this)" >&2
        squad-ds hosts "$hostfile" --recipe "$recipe" --master-port "$master_port" "${check_args[@]}" >/dev/null \
            || { echo "launch/train.sh: the hosts check found problems (above); not launching" >&2; exit 2; }
    fi
fi

exec deepspeed --num_gpus "$NUM_GPUS" --master_port "$master_port" "${launcher_args[@]}" \
    --no_local_rank --module squad_ds.train --recipe "$recipe" "$@"
