#!/usr/bin/env bash
# A real, single-machine Slurm cluster for tests: Debian 12's Slurm 22.05 packages,
# one slurmctld, one slurmd per fake node (node1..nodeN, all on 127.0.0.1), munge auth,
# and slurmdbd + MariaDB accounting (so `sacct` works: submitit polls it, and without
# it never returns on a job that died).
#
#   tests/cluster/local_slurm.sh start    install what is missing, (re)start, wait for idle nodes
#   tests/cluster/local_slurm.sh stop     stop every daemon we started (by pid file), undo /etc/hosts
#   tests/cluster/local_slurm.sh status   exit 0 iff every daemon is up and every node answers
#
# Needs root (daemons, /etc/slurm, /etc/hosts) and, the first time, apt-get.
# Works without systemd and without cgroups (CI containers): daemons are started by hand.
# `start` is idempotent: with the same knobs and a healthy cluster it returns at once;
# otherwise it restarts the Slurm daemons with a freshly written config. Safe after a
# killed run: stale pid files are recognised, jobs left from an earlier run are cancelled.
#
# Knobs (environment; LOCAL_SLURM_* so that sbatch/srun, which read SLURM_*, never see them):
#   LOCAL_SLURM_NODES=2          fake nodes node1..nodeN
#   LOCAL_SLURM_CPUS=2           CPUs each node advertises (may exceed the real cores)
#   LOCAL_SLURM_MEM_MB=4096      RealMemory each node advertises (MB; not enforced: no cgroups)
#   LOCAL_SLURM_ACCOUNTING=1     1: slurmdbd + MariaDB (sacct works); 0: none (faster start)
#   LOCAL_SLURM_CRED_EXPIRE=10   seconds; also how long a requeued job waits before it may restart
set -euo pipefail

NODES=${LOCAL_SLURM_NODES:-2}
CPUS=${LOCAL_SLURM_CPUS:-2}
MEM_MB=${LOCAL_SLURM_MEM_MB:-4096}
ACCOUNTING=${LOCAL_SLURM_ACCOUNTING:-1}
CRED_EXPIRE=${LOCAL_SLURM_CRED_EXPIRE:-10}

CLUSTER=megatrain-local
CONF=/etc/slurm/slurm.conf            # where sbatch/srun/sinfo look by default: no SLURM_CONF needed
MARK="# Written by megatrain tests/cluster/local_slurm.sh"   # we only ever overwrite our own config
RUN=/run/local-slurm                  # our pid files and markers (tmpfs: gone after a reboot)
LOGS=/var/log/slurm
HOSTS_TAG="# megatrain-local-slurm"   # tags our /etc/hosts line so that stop removes exactly it
MUNGE_PID=/run/munge/munged.pid       # munged's default; clients find its socket in /run/munge

T0=$(date +%s%N)
log() { local ms=$(( ($(date +%s%N) - T0) / 1000000 )); printf '[local_slurm %d.%03ds] %s\n' $((ms / 1000)) $((ms % 1000)) "$*"; }
die() { echo "local_slurm: error: $*" >&2; exit 1; }
node_names() { local i; for i in $(seq 1 "$NODES"); do printf 'node%d ' "$i"; done; }

# ------------------------------------------------------------------ pid-file helpers
# A pid file counts only if its process is alive *and* is the daemon we expect: after a
# killed run or a reboot the number may belong to an unrelated process.
# A zombie counts as dead: a container's pid 1 may reap exited daemons only seconds later.
running() {  # running PID: exists and is not a zombie (state field after "(comm) " in /proc/PID/stat)
  local stat
  stat=$(cat /proc/"$1"/stat 2>/dev/null) || return 1
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}
alive() {  # alive PIDFILE COMM -> prints the pid, returns 0 if that daemon runs
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$2" ] && running "$pid" || return 1
  echo "$pid"
}
stop_daemons() {  # stop_daemons PIDFILE:COMM...: SIGTERM all at once, wait up to 10 s, then SIGKILL
  local spec pid pids=()
  for spec in "$@"; do
    if pid=$(alive "${spec%:*}" "${spec##*:}"); then kill "$pid" 2>/dev/null && pids+=("$pid"); fi
    rm -f "${spec%:*}"
  done
  for _ in $(seq 1 100); do
    local running=0
    for pid in "${pids[@]}"; do running "$pid" && running=1; done
    [ "$running" = 0 ] && break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do
    running "$pid" && { log "pid $pid ignored SIGTERM: SIGKILL"; kill -9 "$pid" 2>/dev/null || true; }
  done
  # Give pid 1 a few seconds to reap them, so that `pgrep slurm` right after a stop is empty.
  for _ in $(seq 1 50); do
    for pid in "${pids[@]}"; do [ -e /proc/"$pid" ] && { sleep 0.1; continue 2; }; done
    break
  done
  return 0
}
stop_slurm_daemons() {
  local f specs=("$RUN/slurmctld.pid:slurmctld" "$RUN/slurmdbd.pid:slurmdbd")
  for f in "$RUN"/slurmd-*.pid; do [ -e "$f" ] && specs+=("$f:slurmd"); done
  stop_daemons "${specs[@]}"
}
mariadb_up() { mysqladmin ping >/dev/null 2>&1; }
# Daemons must not inherit fd 9, the lock below: they would hold it forever and the next
# start/stop would wait on it. (slurmctld/slurmd close it; munged, slurmdbd, mysqld do not.)
spawn() { "$@" 9>&-; }

# ------------------------------------------------------------------ packages
install_packages() {
  local pkgs=(slurmctld slurmd slurm-client munge libpmix-dev) missing=() p
  [ "$ACCOUNTING" = 1 ] && pkgs+=(slurmdbd mariadb-server)
  if ! command -v dpkg >/dev/null; then   # not Debian: trust a Slurm installed some other way
    for p in munged slurmctld slurmd sbatch; do command -v "$p" >/dev/null || die "no dpkg/apt and no $p"; done
    return 0
  fi
  for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "missing packages (${missing[*]}) and no apt-get to install them"
  log "installing: ${missing[*]} (log: /tmp/local_slurm.apt.log)"
  # Packages' postinst scripts would start munge/mariadb/slurm through init.d with their
  # own configs; a policy-rc.d that says "no" (exit 101) keeps every daemon ours.
  local policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"
  fi
  local rc=0
  {
    export DEBIAN_FRONTEND=noninteractive
    dpkg --configure -a   # finish an install that an earlier, killed run left half done
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"
  } > /tmp/local_slurm.apt.log 2>&1 || rc=$?
  [ -n "$policy" ] && rm -f "$policy"
  if [ $rc -ne 0 ]; then
    tail -n 20 /tmp/local_slurm.apt.log >&2
    die "apt-get failed (rc=$rc) installing: ${missing[*]}"
  fi
  log "packages installed"
}

# ------------------------------------------------------------------ config
write_slurm_conf() {  # write_slurm_conf FILE
  local acct="AccountingStorageType=accounting_storage/none" i
  [ "$ACCOUNTING" = 1 ] && acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819"
  cat > "$1" <<EOF
$MARK
# Knobs: nodes=$NODES cpus=$CPUS mem_mb=$MEM_MB accounting=$ACCOUNTING cred_expire=$CRED_EXPIRE
ClusterName=$CLUSTER
SlurmctldHost=localhost
# Root runs everything: tests submit as root, no slurm user to create.
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A job step credential lives cred_expire seconds (default 120), and a requeued job may not
# restart before the old credential has expired: 10 s makes a requeue cycle ~14 s, not ~2 min.
AuthInfo=cred_expire=$CRED_EXPIRE
SlurmctldPort=6817
# Job state survives restarts, so job ids keep growing: sacct -j N must never find an older job N.
StateSaveLocation=/var/spool/slurmctld
# %n = node name: every fake node needs its own spool, pid file, log and tmp dir.
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd-%n.log
# PMIx (srun --mpi=pmix) keeps per-job files under TmpFS; a shared /tmp collides across fake nodes.
TmpFS=/tmp/slurmtmp-%n
# No cgroups in CI containers: track processes through /proc, bind nothing, gather no usage.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
$acct
JobCompType=jobcomp/none
# Backfill every second (default 30 s): pending and requeued jobs start as soon as they may.
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1
# Cores are the consumable; memory is not (no cgroups to enforce it; --mem is still checked
# against RealMemory). With memory consumable and no --mem, a job would take a whole node.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Trust CPUs/RealMemory below rather than the hardware: 2 nodes x 2 CPUs on a 2-core machine.
SlurmdParameters=config_overrides
# srun picks no MPI plugin unless asked: --mpi=pmi2 (MPICH), --mpi=pmix (Open MPI).
MpiDefault=none
MailProg=/bin/true
# A node that was DOWN (e.g. after a killed run) comes back as soon as its slurmd registers.
ReturnToService=2
# Seconds between SIGTERM and SIGKILL when a job is cancelled or hits its time limit
# (default 30). Measured: a --time=1 job ends TIMEOUT after ~67 s.
KillWait=5
# A daemon silent this long counts as down (defaults 120 s / 300 s): a test that kills a
# slurmd sees its node DOWN (and its jobs NODE_FAIL/requeued) within a test's patience.
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=DEFAULT CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
EOF
  # Distinct slurmd ports: all nodes share 127.0.0.1.
  for i in $(seq 1 "$NODES"); do
    echo "NodeName=node$i NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((17000 + i))" >> "$1"
  done
  # MaxTime unlimited, so any --time a test asks for (even 1 minute) is accepted and enforced;
  # DefaultTime bounds a forgotten job.
  echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE DefaultTime=60 State=UP" >> "$1"
}

write_slurmdbd_conf() {
  cat > /etc/slurm/slurmdbd.conf <<EOF
$MARK
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
LogFile=$LOGS/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmdbpass
StorageLoc=slurm_acct_db
EOF
  chmod 600 /etc/slurm/slurmdbd.conf   # slurmdbd refuses a world-readable config (it holds a password)
}

# ------------------------------------------------------------------ status
nodes_ready() {  # every node answers and is usable: idle/alloc/mix, no * (not responding), no drain
  local states
  states=$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u) || return 1
  [ "$(echo "$states" | grep -cE ' (idle|alloc|mix|comp)$')" -eq "$NODES" ]
}
healthy() {  # quiet check used by start and status
  local n
  alive "$MUNGE_PID" munged >/dev/null || return 1
  alive "$RUN/slurmctld.pid" slurmctld >/dev/null || return 1
  for n in $(node_names); do alive "$RUN/slurmd-$n.pid" slurmd >/dev/null || return 1; done
  if [ "$ACCOUNTING" = 1 ]; then alive "$RUN/slurmdbd.pid" slurmdbd >/dev/null || return 1; fi
  nodes_ready
}

cmd_status() {
  local n pid
  show() { if pid=$(alive "$1" "$2"); then echo "  $3: up (pid $pid)"; else echo "  $3: down"; fi; }
  show "$MUNGE_PID" munged munged
  [ "$ACCOUNTING" = 1 ] && { if mariadb_up; then echo "  mariadb: up"; else echo "  mariadb: down"; fi; }
  [ "$ACCOUNTING" = 1 ] && show "$RUN/slurmdbd.pid" slurmdbd slurmdbd
  show "$RUN/slurmctld.pid" slurmctld slurmctld
  for n in $(node_names); do show "$RUN/slurmd-$n.pid" slurmd "slurmd $n"; done
  if healthy; then sinfo; echo "status: up"; return 0; fi
  echo "status: not up"; return 1
}

# ------------------------------------------------------------------ start
cmd_start() {
  [ "$(id -u)" = 0 ] || die "start needs root (daemons, /etc/slurm, /etc/hosts)"
  mkdir -p "$RUN"
  # Never clobber a real cluster's config (this script on a login node, a dev's own setup).
  if [ -e "$CONF" ] && ! grep -qxF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script; move it away first"
  fi
  install_packages

  local new; new=$(mktemp); write_slurm_conf "$new"
  if [ -e "$CONF" ] && cmp -s "$new" "$CONF" && healthy; then
    rm -f "$new"; log "already up with this config"; return 0
  fi

  # Anything of ours still running (another config, a killed run) goes first.
  stop_slurm_daemons

  # --- munge: Slurm's authentication. One key, shared by every daemon and client here.
  mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  if ! alive "$MUNGE_PID" munged >/dev/null; then
    rm -f "$MUNGE_PID"
    # --force: start even if a killed munged left its socket behind.
    spawn runuser -u munge -- /usr/sbin/munged --force
  fi
  munge -n | unmunge >/dev/null || die "munge does not work (see /var/log/munge/munged.log)"
  log "munged up (pid $(cat "$MUNGE_PID"))"

  # --- fake node names must resolve: jobs use them as MASTER_ADDR, and an unresolvable
  #     name makes torch's rendezvous hang ~130 s before it fails.
  sed -i "/$HOSTS_TAG\$/d" /etc/hosts
  echo "127.0.0.1 $(node_names)$HOSTS_TAG" >> /etc/hosts

  mkdir -p /etc/slurm /var/spool/slurmctld "$LOGS"
  local n
  for n in $(node_names); do mkdir -p "/var/spool/slurmd/$n" "/tmp/slurmtmp-$n"; done
  mv "$new" "$CONF"; chmod 644 "$CONF"

  # --- accounting: MariaDB, then slurmdbd (slurmctld connects to it when it starts).
  if [ "$ACCOUNTING" = 1 ]; then
    if ! mariadb_up; then
      spawn /etc/init.d/mariadb start >/dev/null || die "mariadb did not start (see /var/log/mysql/)"
      touch "$RUN/mariadb.ours"     # stop shuts down only a MariaDB that we started
    fi
    mysql -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmdbpass';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
    write_slurmdbd_conf
    spawn slurmdbd
    for _ in $(seq 1 150); do sacctmgr -n -P list cluster >/dev/null 2>&1 && break; sleep 0.2; done
    sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
    log "mariadb + slurmdbd up (pid $(cat "$RUN/slurmdbd.pid"))"
  fi

  # --- controller, then one slurmd per fake node (-N: which NodeName line this one is).
  spawn slurmctld
  for n in $(node_names); do spawn slurmd -N "$n"; done
  for _ in $(seq 1 300); do nodes_ready && break; sleep 0.2; done
  if ! nodes_ready; then
    sinfo -N -l >&2 || true; tail -n 20 "$LOGS/slurmctld.log" >&2
    die "nodes did not become idle within 60 s"
  fi
  # Jobs saved in the controller's state by an earlier, killed run would hold the nodes.
  local stale; stale=$(squeue -h -o %i | tr '\n' ' ')
  if [ -n "${stale// }" ]; then
    log "cancelling jobs left by an earlier run: $stale"
    # shellcheck disable=SC2086
    scancel $stale
  fi
  log "cluster up: $NODES nodes x $CPUS CPUs, accounting=$ACCOUNTING"
}

# ------------------------------------------------------------------ stop
cmd_stop() {
  [ "$(id -u)" = 0 ] || die "stop needs root"
  # Cancel jobs first: a slurmstepd (and its tasks) outlives a stopped slurmd.
  if alive "$RUN/slurmctld.pid" slurmctld >/dev/null && [ -n "$(squeue -h -o %i 2>/dev/null)" ]; then
    squeue -h -o %i | xargs -r scancel 2>/dev/null || true
    for _ in $(seq 1 150); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
  fi
  stop_slurm_daemons
  # MariaDB (only if we started it) and munged, in parallel: each takes 1-2 s.
  if [ -e "$RUN/mariadb.ours" ]; then
    { /etc/init.d/mariadb stop >/dev/null 2>&1 || true; } &
    rm -f "$RUN/mariadb.ours"
  fi
  stop_daemons "$MUNGE_PID:munged"
  wait
  sed -i "/$HOSTS_TAG\$/d" /etc/hosts
  rm -rf /tmp/slurmtmp-node*
  local left; left=$(pgrep -x slurmstepd || true)
  [ -z "$left" ] || log "warning: slurmstepd still running (pids: $(echo $left))"
  log "stopped"
}

case "${1:-}" in
  # One start/stop at a time (two pytest sessions, a dev's shell and CI...).
  start|stop) mkdir -p "$RUN"; exec 9>"$RUN/lock"; flock 9; "cmd_$1" ;;
  status) cmd_status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
