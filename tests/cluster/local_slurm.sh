#!/usr/bin/env bash
# A real, single-machine Slurm cluster for tests: Debian 12's Slurm 22.05 packages,
# one slurmctld, one slurmd per fake node (node1..nodeN), munge auth, and slurmdbd + MariaDB
# accounting (so `sacct` works: submitit polls it, and without it never returns on a job
# that died).
#
#   tests/cluster/local_slurm.sh start    install what is missing, (re)start, wait for idle nodes
#   tests/cluster/local_slurm.sh stop     stop every daemon we started (by pid file), remove the
#                                         network, undo /etc/hosts
#   tests/cluster/local_slurm.sh status   exit 0 iff every daemon is up and every node answers;
#                                         says which network mode is up
#   tests/cluster/local_slurm.sh link NODE down|up   cut / restore a node's link (netns mode)
#
# Network (LOCAL_SLURM_NET):
#   netns     each node is a Linux network namespace (mt-slurm-nodeN) with its own UTS namespace
#             (hostname nodeN): eth0 = 10.77.0.(10+N)/24, the other end of its veth pair
#             (mt-slurm-nodeN in the root namespace) on the bridge mt-slurm-br0 = 10.77.0.1, the
#             default route. slurmd of node N runs inside, so the batch script and every task do
#             too: rendezvous, MASTER_ADDR=nodeN, gloo and MPI traffic cross real interfaces.
#             slurmctld, slurmdbd and MariaDB stay in the root namespace, reached at 10.77.0.1;
#             munge's socket is a file, the same in every namespace. /etc/hosts maps nodeN to its
#             address. Nothing outside our own namespaces and bridge gets an address or a route.
#   loopback  every node on 127.0.0.1 (distinct slurmd ports), one hostname: for machines that
#             cannot create network namespaces (no CAP_NET_ADMIN/CAP_SYS_ADMIN, no iproute2)
#   auto      (default) netns if a probe namespace + veth pair + bridge can be made, else
#             loopback, logging why
# `link NODE down` sets the root-namespace end of the node's veth down: the node keeps its
# address and routes (as after a pulled cable or a dead switch port), its packets are dropped
# on the bridge, so peers see silence (timeouts), not an error; `up` restores it exactly.
# Setting eth0 inside the namespace down instead would delete the node's routes. A cut longer
# than SlurmdTimeout (30 s) leaves the node DOWN until slurmctld asks it to register (every ~20
# pings: up to ~200 s) or `scontrol update nodename=NODE state=resume` (1 s). Measured: with no
# timeout of its own, a connect to a cut node fails (EHOSTUNREACH) after ~3 s, or ~39 s when the
# peer's ARP entry was fresh; an established connection just retransmits (tcp_retries2: ~15 min).
#
# Needs root (daemons, /etc/slurm, /etc/hosts, namespaces) and, the first time, apt-get.
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
#   LOCAL_SLURM_NET=auto         netns | loopback | auto (above)
#   LOCAL_SLURM_SUBNET=10.77.0   the netns mode's /24 (its first three numbers); start refuses one
#                                that an interface or route of this machine already uses
set -euo pipefail

NODES=${LOCAL_SLURM_NODES:-2}
CPUS=${LOCAL_SLURM_CPUS:-2}
MEM_MB=${LOCAL_SLURM_MEM_MB:-4096}
ACCOUNTING=${LOCAL_SLURM_ACCOUNTING:-1}
CRED_EXPIRE=${LOCAL_SLURM_CRED_EXPIRE:-10}
NET=${LOCAL_SLURM_NET:-auto}
SUBNET=${LOCAL_SLURM_SUBNET:-10.77.0}

CLUSTER=megatrain-local
CONF=/etc/slurm/slurm.conf            # where sbatch/srun/sinfo look by default: no SLURM_CONF needed
MARK="# Written by megatrain tests/cluster/local_slurm.sh"   # we only ever overwrite our own config
RUN=/run/local-slurm                  # our pid files and markers (tmpfs: gone after a reboot)
LOGS=/var/log/slurm
HOSTS_TAG="# megatrain-local-slurm"   # tags our /etc/hosts line so that stop removes exactly it
MUNGE_PID=/run/munge/munged.pid       # munged's default; clients find its socket in /run/munge
NET_STATE=$RUN/network                # the network mode that is up (line 1) and why (line 2)
NS_PREFIX=mt-slurm-                   # namespace and root-side veth of node N: mt-slurm-nodeN
BRIDGE=mt-slurm-br0
CTL_ADDR=$SUBNET.1                    # the bridge: slurmctld and slurmdbd, as the nodes see them

T0=$(date +%s%N)
log() { local ms=$(( ($(date +%s%N) - T0) / 1000000 )); printf '[local_slurm %d.%03ds] %s\n' $((ms / 1000)) $((ms % 1000)) "$*"; }
die() { echo "local_slurm: error: $*" >&2; exit 1; }
node_names() { local i; for i in $(seq 1 "$NODES"); do printf 'node%d ' "$i"; done; }
node_ip() { echo "$SUBNET.$((10 + $1))"; }   # netns mode: node N's address

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

# ------------------------------------------------------------------ network (netns mode)
net_probe() {  # can this machine build the netns network? Prints why not.
  local c p=${NS_PREFIX}probe err
  for c in ip nsenter unshare; do command -v "$c" >/dev/null || { echo "no $c command"; return 1; }; done
  ip link del "${p}0" 2>/dev/null || true; ip link del "${p}b" 2>/dev/null || true
  ip netns del "$p" 2>/dev/null || true
  err=$( { ip netns add "$p" && ip link add "${p}b" type bridge \
           && ip link add "${p}0" type veth peer name eth0 netns "$p" && unshare --uts true; } 2>&1 ) || true
  ip link del "${p}0" 2>/dev/null || true; ip link del "${p}b" 2>/dev/null || true
  ip netns del "$p" 2>/dev/null || true
  [ -z "$err" ] || { echo "${err//$'\n'/; }"; return 1; }
}
subnet_free() {  # no interface or route of this machine (other than ours) uses the subnet
  local used
  used=$( { ip -o -4 addr show to "$SUBNET.0/24"; ip -4 route show root "$SUBNET.0/24"
            ip -4 route show match "$SUBNET.0/24" | grep -v '^default'; } 2>/dev/null \
          | grep -vw -e "$BRIDGE" -e "dev $BRIDGE" || true)
  [ -z "$used" ] || die "subnet $SUBNET.0/24 is in use on this machine ($(echo $used)); pick another with LOCAL_SLURM_SUBNET=10.x.y"
}
resolve_net() {  # sets MODE (netns|loopback) and NET_WHY from the LOCAL_SLURM_NET knob
  local why
  case "$NET" in
    loopback) MODE=loopback NET_WHY="LOCAL_SLURM_NET=loopback was asked for" ;;
    netns|auto)
      if why=$(net_probe); then
        MODE=netns NET_WHY="LOCAL_SLURM_NET=$NET"
        # interface names have at most 15 characters: mt-slurm-node99
        [ "$NODES" -le 99 ] || die "LOCAL_SLURM_NODES=$NODES: the netns network has room for 99"
        subnet_free
      elif [ "$NET" = netns ]; then
        die "LOCAL_SLURM_NET=netns, but this machine cannot create network namespaces: $why"
      else
        MODE=loopback NET_WHY="this machine cannot create network namespaces: $why"
      fi ;;
    *) die "LOCAL_SLURM_NET=$NET: expected netns, loopback or auto" ;;
  esac
}
running_mode() { head -n 1 "$NET_STATE" 2>/dev/null || echo none; }
net_up() {  # the bridge, then per node: namespace, veth pair (eth0 inside), address, routes
  local i ns
  ip link add "$BRIDGE" type bridge
  ip addr add "$CTL_ADDR/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  for i in $(seq 1 "$NODES"); do
    ns=${NS_PREFIX}node$i
    ip netns add "$ns"
    ip link add "$ns" type veth peer name eth0 netns "$ns"
    ip link set "$ns" master "$BRIDGE" up
    ip -n "$ns" addr add "$(node_ip "$i")/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    ip -n "$ns" route add default via "$CTL_ADDR"
    # No DNS server on our network (the root namespace forwards nothing): an empty resolv.conf
    # (slurmd's, see start_slurmd; also `ip netns exec`'s) makes a lookup fail at once instead of
    # after 10 s of timeouts (torch's store looks up every peer's name); names: /etc/hosts.
    mkdir -p "/etc/netns/$ns"
    echo "# megatrain tests/cluster/local_slurm.sh: no DNS on the fake nodes" > "/etc/netns/$ns/resolv.conf"
  done
}
net_down() {  # remove our namespaces (ending what still runs inside), veths and bridge
  command -v ip >/dev/null || return 0
  local ns pids link
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${NS_PREFIX}(node[0-9]+|probe)$"); do
    # Only tasks of a killed run live here (stop cancelled the jobs, stopped the slurmds).
    pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
    if [ -n "${pids// }" ]; then
      log "ending processes left in namespace $ns: $pids"
      # shellcheck disable=SC2086
      kill -9 $pids 2>/dev/null || true
    fi
    ip netns del "$ns" 2>/dev/null || true
  done
  rm -rf /etc/netns/"$NS_PREFIX"*
  if [ -d /etc/netns ]; then rmdir --ignore-fail-on-non-empty /etc/netns; fi
  # Deleting the root-side end deletes the pair (even if a process still holds its namespace).
  for link in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 \
                | grep -E "^${NS_PREFIX}(node[0-9]+|probe0|probeb|br0)$"); do
    ip link del "$link" 2>/dev/null || true
  done
}
net_ok() {  # netns mode: every namespace there, its link up, its slurmd inside it
  local n ns pid
  ip link show dev "$BRIDGE" up 2>/dev/null | grep -q . || return 1
  for n in $(node_names); do
    ns=$NS_PREFIX$n
    [ -n "$(ip -o link show dev "$ns" up 2>/dev/null)" ] || return 1
    pid=$(alive "$RUN/slurmd-$n.pid" slurmd) || return 1
    [ "$(ip netns identify "$pid" 2>/dev/null)" = "$ns" ] || return 1
  done
}
start_slurmd() {  # start_slurmd NODE: in netns mode inside the node's namespaces, hostname = NODE
  if [ "$MODE" = netns ]; then
    # The node's network namespace; its own hostname; its own mount namespace (a slave of the
    # root's: later mounts still show) for the node's resolv.conf. Not `ip netns exec`: it
    # remounts /sys, without /sys/fs/cgroup, which slurmd needs.
    spawn nsenter --net="/run/netns/$NS_PREFIX$1" unshare --uts --mount --propagation slave -- \
      sh -c 'mount --bind "$2" /etc/resolv.conf && hostname "$1" && exec slurmd -N "$1"' \
      sh "$1" "/etc/netns/$NS_PREFIX$1/resolv.conf"
  else
    spawn slurmd -N "$1"
  fi
}

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
write_slurm_conf() {  # write_slurm_conf FILE (for $MODE)
  # The controller and slurmdbd run in the root namespace: the nodes reach them at the bridge.
  local ctl=localhost ctl_host=localhost acct="AccountingStorageType=accounting_storage/none" i
  [ "$MODE" = netns ] && ctl=$CTL_ADDR ctl_host="localhost($CTL_ADDR)"
  [ "$ACCOUNTING" = 1 ] && acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$ctl
AccountingStoragePort=6819"
  cat > "$1" <<EOF
$MARK
# Knobs: nodes=$NODES cpus=$CPUS mem_mb=$MEM_MB accounting=$ACCOUNTING cred_expire=$CRED_EXPIRE net=$MODE subnet=$SUBNET
ClusterName=$CLUSTER
SlurmctldHost=$ctl_host
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
  for i in $(seq 1 "$NODES"); do
    if [ "$MODE" = netns ]; then   # a host of its own: its name, its address, slurmd's usual port
      echo "NodeName=node$i NodeHostname=node$i NodeAddr=$(node_ip "$i")" >> "$1"
    else                           # distinct slurmd ports: all nodes share 127.0.0.1
      echo "NodeName=node$i NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((17000 + i))" >> "$1"
    fi
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
  if [ "$ACCOUNTING" = 1 ]; then
    mariadb_up && alive "$RUN/slurmdbd.pid" slurmdbd >/dev/null || return 1
  fi
  if [ "$MODE" = netns ]; then net_ok || return 1; fi
  nodes_ready
}

cmd_status() {
  local n pid i
  MODE=$(running_mode)
  case "$MODE" in
    netns)
      printf '  network: netns (bridge %s %s/24;' "$BRIDGE" "$CTL_ADDR"
      for i in $(seq 1 "$NODES"); do
        printf ' node%d %s link %s;' "$i" "$(node_ip "$i")" \
          "$([ -n "$(ip -o link show dev "${NS_PREFIX}node$i" up 2>/dev/null)" ] && echo up || echo down)"
      done
      echo " $(sed -n 2p "$NET_STATE"))" ;;
    loopback) echo "  network: loopback ($(sed -n 2p "$NET_STATE"))" ;;
    *) echo "  network: none" ;;
  esac
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
  resolve_net

  local new; new=$(mktemp); write_slurm_conf "$new"
  if [ -e "$CONF" ] && cmp -s "$new" "$CONF" && [ "$(running_mode)" = "$MODE" ] && healthy; then
    rm -f "$new"; log "already up with this config (network: $MODE)"; return 0
  fi

  # Anything of ours still running (another config, a killed run) goes first, then its network.
  stop_slurm_daemons
  net_down
  rm -f "$NET_STATE"
  if [ "$MODE" = netns ]; then
    net_up
    log "network: netns, bridge $BRIDGE $CTL_ADDR/24, nodes at $(node_ip 1)..$(node_ip "$NODES")"
  else
    log "network: loopback ($NET_WHY)"
  fi
  printf '%s\n%s\n' "$MODE" "$NET_WHY" > "$NET_STATE"

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
  if [ "$MODE" = netns ]; then
    for i in $(seq 1 "$NODES"); do echo "$(node_ip "$i") node$i $HOSTS_TAG" >> /etc/hosts; done
  else
    echo "127.0.0.1 $(node_names)$HOSTS_TAG" >> /etc/hosts
  fi

  mkdir -p /etc/slurm /var/spool/slurmctld "$LOGS"
  local n i
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
  for n in $(node_names); do
    start_slurmd "$n" || die "slurmd $n did not start (see $LOGS/slurmd-$n.log)"
  done
  for _ in $(seq 1 300); do nodes_ready && break; sleep 0.2; done
  if ! nodes_ready; then
    sinfo -N -l >&2 || true; tail -n 20 "$LOGS/slurmctld.log" >&2
    die "nodes did not become idle within 60 s"
  fi
  # Node to controller works (they registered); node to node crosses the bridge, where a
  # firewall may drop it (br_netfilter + a FORWARD policy of DROP, as Docker sets): check it.
  if [ "$MODE" = netns ] && [ "$NODES" -ge 2 ]; then
    timeout 5 nsenter --net="/run/netns/${NS_PREFIX}node1" bash -c "echo > /dev/tcp/$(node_ip 2)/6818" \
      || die "node1 cannot reach node2's slurmd at $(node_ip 2):6818 across $BRIDGE (a firewall? \
bridge-nf-call-iptables=$(cat /proc/sys/net/bridge/bridge-nf-call-iptables 2>/dev/null || echo -)); \
LOCAL_SLURM_NET=loopback avoids the bridge"
  fi
  # Jobs saved in the controller's state by an earlier, killed run would hold the nodes.
  local stale; stale=$(squeue -h -o %i | tr '\n' ' ')
  if [ -n "${stale// }" ]; then
    log "cancelling jobs left by an earlier run: $stale"
    # shellcheck disable=SC2086
    scancel $stale
  fi
  log "cluster up: $NODES nodes x $CPUS CPUs, accounting=$ACCOUNTING, network=$MODE"
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
  net_down
  rm -f "$NET_STATE"
  sed -i "/$HOSTS_TAG\$/d" /etc/hosts
  rm -rf /tmp/slurmtmp-node*
  local left; left=$(pgrep -x slurmstepd || true)
  [ -z "$left" ] || log "warning: slurmstepd still running (pids: $(echo $left))"
  log "stopped"
}

# ------------------------------------------------------------------ link
cmd_link() {  # link NODE down|up: the node's veth end on the bridge (why that end: see the top)
  local node=${1:-} state=${2:-}
  [ "$state" = up ] || [ "$state" = down ] || die "usage: $0 link NODE down|up"
  [ "$(id -u)" = 0 ] || die "link needs root"
  [ "$(running_mode)" = netns ] || die "link needs the netns network; this cluster's is: $(running_mode)"
  # The veth ends are where start made them, with slurmctld: from inside a node (a job), go there.
  local ip=(ip) ctl
  if ! ip link show dev "$NS_PREFIX$node" >/dev/null 2>&1 && ctl=$(alive "$RUN/slurmctld.pid" slurmctld); then
    ip=(nsenter --net="/proc/$ctl/ns/net" ip)
  fi
  "${ip[@]}" link show dev "$NS_PREFIX$node" >/dev/null 2>&1 || die "no node '$node' (nodes: $(node_names))"
  "${ip[@]}" link set dev "$NS_PREFIX$node" "$state"
  log "$node: link $state"
}

case "${1:-}" in
  # One start/stop at a time (two pytest sessions, a dev's shell and CI...).
  start|stop) mkdir -p "$RUN"; exec 9>"$RUN/lock"; flock 9; "cmd_$1" ;;
  status) cmd_status ;;
  link) shift; cmd_link "$@" ;;
  *) echo "usage: $0 start|stop|status|link NODE down|up" >&2; exit 2 ;;
esac
