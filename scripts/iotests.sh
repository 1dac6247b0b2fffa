#!/usr/bin/env bash
# scripts/iotests.sh [--quick] [--baseline] [--update] [TEST...]
#
# Runs qemu's own test suite (tests/qemu-iotests of the qemu source matching the
# installed qemu-utils, 10.0.2) with diskimg installed as qemu-img and qemu-io the way a
# drop-in is installed: symlinks of those names to the diskimg binary. Nothing else in
# the harness is changed (the qemu-system / qemu-nbd / qemu-storage-daemon programs the
# harness insists on are a stand-in that only answers `-machine help` and
# `-drive format=help`; the selected tests never start them).
#
#   1. fetches the qemu orig tarball with `apt-get source --download-only` through a
#      PRIVATE apt state directory (the system apt configuration is only read) and
#      extracts tests/qemu-iotests + python/ into $IOTESTS_SRC; cached.
#   2. runs the selected tests (scripts/iotests/tests.txt: every bash test that needs
#      only qemu-img/qemu-io; --quick: the pairs of scripts/iotests/quick.txt) per
#      format with diskimg, and with --baseline also with the real qemu-img/qemu-io.
#   3. compares with scripts/iotests/qemu-baseline.tsv (what qemu passes here) and
#      scripts/iotests/known-failures.tsv (pairs diskimg is known to fail, each with
#      the reason), prints the pass table and one summary line:
#        iotests: qemu baseline P0 of N pass; diskimg P of N pass
#      and exits 0 unless a pair qemu passes fails with diskimg without being a known
#      failure (a regression). Known failures that pass now are listed.
#
# Options:
#   --quick      only the CI subset (scripts/iotests/quick.txt; a few minutes)
#   --baseline   also run the real qemu-img/qemu-io and compare with the recorded baseline
#   --update     rewrite scripts/iotests/known-failures.tsv from this (full) run, keeping
#                the reasons already written; with --baseline also the baseline file
#   TEST...      only these tests (names as ./check takes them)
#
# Env:
#   DISKIMG      binary under test (default: target/release/diskimg, built by this script)
#   FORMATS      (default "qcow2 raw vmdk vpc vdi vhdx")   JOBS (./check -j, default 2)
#   IOTESTS_SRC=/tmp/iotests-src  IOTESTS_CACHE=/tmp/iotests-cache  IOTESTS_WORK=/tmp/iotests-run
#   QEMU_DEB_VERSION  source version (default: the installed qemu-utils)
#   DISKIMG_CALL_TIMEOUT=300  seconds per program call (hang guard)
#   IOTESTS_FORMAT_TIMEOUT=5400  seconds per format run
#
# Outputs in $IOTESTS_WORK: {diskimg,qemu}/results.tsv (test fmt status description),
# {diskimg,qemu}/FMT.log, {diskimg,qemu}/bad/FMT/TEST.out.bad (failed outputs),
# regressions.tsv, table.md (the pass table as docs/iotests.md shows it).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DATA=$ROOT/scripts/iotests
FORMATS=${FORMATS:-"qcow2 raw vmdk vpc vdi vhdx"}
JOBS=${JOBS:-2}
SRC=${IOTESTS_SRC:-/tmp/iotests-src}
CACHE=${IOTESTS_CACHE:-/tmp/iotests-cache}
WORK=${IOTESTS_WORK:-/tmp/iotests-run}
IOT=$SRC/tests/qemu-iotests
KNOWN_ORIG_SHA256="qemu_10.0.2+ds.orig.tar.xz 0901da33844a331bf8b3602b9c1fbd178e60b737c8e3ade678255bd090c9b9f1"

QUICK=0 BASELINE=0 UPDATE=0
ARGS=()
for a in "$@"; do
    case "$a" in
        --quick) QUICK=1 ;;
        --baseline) BASELINE=1 ;;
        --update) UPDATE=1 ;;
        -h|--help) sed -n '2,45p' "$0"; exit 0 ;;
        -*) echo "unknown option $a" >&2; exit 2 ;;
        *) ARGS+=("$a") ;;
    esac
done

log() { printf '[iotests] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 2; }

# ------------------------------------------------------------------ step 1: source
apt_private() {
    local A=$CACHE/apt s
    mkdir -p "$A/lists/partial" "$A/cache/archives/partial" "$A/sources.list.d"
    : > "$A/sources.list"
    rm -f "$A"/sources.list.d/*
    local codename; codename=$(. /etc/os-release 2>/dev/null; echo "${VERSION_CODENAME:-}")
    for s in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$s" ] && sed -nE 's/^[[:space:]]*deb([[:space:]])/deb-src\1/p' "$s" >> "$A/sources.list"
    done
    for s in /etc/apt/sources.list.d/*.sources; do
        [ -f "$s" ] || continue
        sed -E 's/^Types:.*/Types: deb-src/' "$s" > "$A/sources.list.d/$(basename "$s")"
        if [ -n "$codename" ]; then
            sed -i -E "/^Suites:/{/(^|[[:space:]])${codename}-backports([[:space:]]|\$)/!s/^(Suites:.*[[:space:]]${codename})([[:space:]]|\$)/\1 ${codename}-backports\2/}" \
                "$A/sources.list.d/$(basename "$s")"
        fi
    done
    # The installed qemu 10.0.x comes from <codename>-backports: add that suite.
    if [ -n "$codename" ] && [ -s "$A/sources.list" ]; then
        sed -nE "s/^(deb-src[[:space:]].*[[:space:]])${codename}([[:space:]].*)\$/\1${codename}-backports\2/p" \
            "$A/sources.list" | sort -u >> "$A/sources.list"
    fi
    APT_O=(-o "Dir::Etc::SourceList=$A/sources.list" -o "Dir::Etc::SourceParts=$A/sources.list.d"
           -o "Dir::State::Lists=$A/lists" -o "Dir::Cache=$A/cache" -o "Debug::NoLocking=1")
    [ "$(id -u)" = 0 ] && APT_O+=(-o "APT::Sandbox::User=root")
    apt-get "${APT_O[@]}" -qq update >&2 2>/dev/null || die "apt-get update (private deb-src lists) failed"
}

latest_orig() {
    ls "$CACHE"/deb/qemu_*.orig.tar.* 2>/dev/null | grep -v '\.asc$' | sort -V | tail -n1
}

fetch_source() {
    if [ -f "$SRC/.iotests-complete" ] && [ -x "$IOT/check" ]; then
        return 0
    fi
    command -v apt-get >/dev/null || die "apt-get missing"
    mkdir -p "$CACHE/deb"
    local orig; orig=$(latest_orig)
    if [ -z "$orig" ]; then
        apt_private
        local want=${QEMU_DEB_VERSION:-$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null)}
        # The .dsc / .debian.tar of a backports version may be missing from the mirror;
        # only the orig tarball is needed.
        ( cd "$CACHE/deb" && [ -n "$want" ] && apt-get "${APT_O[@]}" -qq source --download-only "qemu=$want" >&2 2>/dev/null ) || true
        orig=$(latest_orig)
        [ -n "$orig" ] || die "qemu orig tarball for qemu=$want not downloaded"
    fi
    local base sum known
    base=$(basename "$orig"); sum=$(sha256sum "$orig" | cut -d' ' -f1)
    known=$(printf '%s\n' "$KNOWN_ORIG_SHA256" | awk -v b="$base" '$1==b{print $2}')
    if [ -n "$known" ] && [ "$known" != "$sum" ]; then
        die "$base: sha256 $sum does not match the known $known"
    fi
    log "extracting tests/qemu-iotests from $base"
    rm -rf "$SRC"; mkdir -p "$SRC"
    local top; top=$(tar -tf "$orig" | head -n1 | cut -d/ -f1)
    tar -xf "$orig" -C "$SRC" --strip-components=1 "$top/tests/qemu-iotests" "$top/python" ||
        die "extraction failed"
    [ -x "$IOT/check" ] || die "no tests/qemu-iotests/check in $base"
    printf '%s %s\n' "$base" "$sum" > "$SRC/.iotests-complete"
}

# ------------------------------------------------------------------ programs
make_bins() {
    local B=$WORK/bin
    rm -rf "$B"; mkdir -p "$B/diskimg/link"
    # qemu-system stand-in: testenv.py runs `QEMU_PROG -machine help`, and
    # _require_drivers runs `$QEMU -drive format=help`; anything else fails.
    cat > "$B/qemu-system-dummy" <<'EOF'
#!/bin/sh
case " $* " in
  *" -machine help "*) echo "Supported machines are:"; echo "none                 empty machine"; exit 0 ;;
  *" -drive format=help "*)
    printf 'Supported formats: %s\n' "$(qemu-img --help | sed -n '/^Supported image formats:/,/^See /p' | sed '1d;$d' | tr -s ' \n' ' ' | sed 's/^ //;s/ $//')"
    exit 0 ;;
esac
echo "qemu-system-dummy: qemu-system is not available here" >&2
exit 1
EOF
    # diskimg as installed for drop-in use: symlinks named qemu-img / qemu-io (the
    # binary takes its role and message prefix from argv[0]), behind a hang guard.
    local p
    for p in qemu-img qemu-io; do
        ln -s "$DISKIMG" "$B/diskimg/link/$p"
        printf '#!/bin/sh\nexec timeout -k 5 %s "%s" "$@"\n' "${DISKIMG_CALL_TIMEOUT:-300}" \
            "$B/diskimg/link/$p" > "$B/diskimg/$p"
        chmod +x "$B/diskimg/$p"
    done
    chmod +x "$B/qemu-system-dummy"
}

# run_mode MODE IMG_PROG IO_PROG -> $WORK/MODE/results.tsv (pairs in $WORK/pairs.tsv)
run_mode() {
    local mode=$1 img=$2 io=$3 fmt
    local D=$WORK/$mode
    rm -rf "$D"; mkdir -p "$D/bad"
    : > "$D/results.tsv"
    for fmt in $FORMATS; do
        local tests=()
        mapfile -t tests < <(awk -v f="$fmt" '$2==f{print $1}' "$WORK/pairs.tsv")
        [ ${#tests[@]} -gt 0 ] || continue
        log "$mode: -$fmt (${#tests[@]} tests, -j $JOBS)"
        rm -rf "$D/scratch" "$D/sock"; mkdir -p "$D/scratch" "$D/sock"
        ( cd "$IOT" &&
          QEMU_PROG=$WORK/bin/qemu-system-dummy QEMU_IMG_PROG=$img QEMU_IO_PROG=$io \
          QEMU_NBD_PROG=$WORK/bin/qemu-system-dummy QSD_PROG=$WORK/bin/qemu-system-dummy \
          TEST_DIR=$D/scratch SOCK_DIR=$D/sock \
          timeout -k 30 "${IOTESTS_FORMAT_TIMEOUT:-5400}" \
          python3 ./check --color off -j "$JOBS" "-$fmt" "${tests[@]}" ) > "$D/$fmt.log" 2>&1
        # result lines: "NAME  STATUS  [hh:mm:ss] [hh:mm:ss]  TIME  DESCRIPTION". With
        # -j, two workers' lines can land on one line ("008 pass [..] ...  001 pass [..] ..."):
        # every record after the first starts a line of its own again.
        tr '\r' '\n' < "$D/$fmt.log" |
            sed -E 's/ {2,}([^ ]+ +(pass|fail|not run|started) +\[[0-9:]+\])/\n\1/g' |
            sed -nE 's/^([^ ]+) +(pass|fail|not run) +\[[0-9:]+\] +\[[0-9:]+\] +[^ ]* *(.*)$/\1\t\2\t\3/p' |
            awk -F'\t' -v f="$fmt" 'BEGIN{OFS="\t"} {sub(/^\(last: [^)]*\) */, "", $3); sub(/ +$/, "", $3); print $1, f, $2, $3}' >> "$D/results.tsv"
        mkdir -p "$D/bad/$fmt"
        awk -F'\t' -v f="$fmt" '$2==f && $3=="fail" {print $1}' "$D/results.tsv" | while read -r t; do
            cp "$D/scratch/$fmt-file-$t/$t.out.bad" "$D/bad/$fmt/" 2>/dev/null
        done
        rm -rf "$D/scratch" "$D/sock"
    done
    # a pair without a result line (harness crash / timeout) counts as failed
    while read -r t fmt; do
        awk -F'\t' -v t="$t" -v f="$fmt" '$1==t && $2==f {found=1} END{exit !found}' "$D/results.tsv" ||
            printf '%s\t%s\tfail\tno result (harness timeout?)\n' "$t" "$fmt" >> "$D/results.tsv"
    done < "$WORK/pairs.tsv"
}

# ------------------------------------------------------------------ main
mkdir -p "$WORK"
# One run per work directory at a time.
exec 9>"$WORK/.lock"
flock -n 9 || die "another run is using $WORK"
fetch_source
# The pairs to run: test and format, from the selection or the quick list.
if [ $QUICK = 1 ]; then
    grep -v '^#' "$DATA/quick.txt" | awk 'NF>1{for(i=2;i<=NF;i++) print $1 "\t" $i}' > "$WORK/pairs.tsv"
else
    if [ ${#ARGS[@]} -gt 0 ]; then printf '%s\n' "${ARGS[@]}"; else grep -v '^#' "$DATA/tests.txt"; fi |
        while read -r t; do for f in $FORMATS; do printf '%s\t%s\n' "$t" "$f"; done; done > "$WORK/pairs.tsv"
fi
if [ $QUICK = 1 ] && [ ${#ARGS[@]} -gt 0 ]; then
    printf '%s\n' "${ARGS[@]}" > "$WORK/only.txt"
    awk -F'\t' 'FNR==NR{o[$1]=1; next} o[$1]' "$WORK/only.txt" "$WORK/pairs.tsv" > "$WORK/pairs.tmp" &&
        mv "$WORK/pairs.tmp" "$WORK/pairs.tsv"
fi
[ -s "$WORK/pairs.tsv" ] || die "no tests selected"

if [ -z "${DISKIMG:-}" ]; then
    log "building target/release/diskimg"
    ( cd "$ROOT" && cargo build --release -q -p diskimg-cli ) || die "cargo build failed"
    DISKIMG=$ROOT/target/release/diskimg
fi
[ -x "$DISKIMG" ] || die "no diskimg binary at $DISKIMG"
make_bins

BASE=$DATA/qemu-baseline.tsv
if [ $BASELINE = 1 ]; then
    run_mode qemu "$(command -v qemu-img)" "$(command -v qemu-io)"
    awk -F'\t' 'FNR==NR { b[$1 SUBSEP $2]=$3; next }
        { k=$1 SUBSEP $2; if ((k in b) && b[k]!=$3) printf "baseline differs: %s %s recorded %s, now %s\n", $1, $2, b[k], $3 }' \
        "$BASE" "$WORK/qemu/results.tsv" >&2
    BASE=$WORK/qemu/results.tsv
fi
run_mode diskimg "$WORK/bin/diskimg/qemu-img" "$WORK/bin/diskimg/qemu-io"

# ------------------------------------------------------------------ compare
KNOWN=$DATA/known-failures.tsv
: > "$WORK/regressions.tsv"
: > "$WORK/fixed.tsv"
awk -F'\t' -v out="$WORK/regressions.tsv" -v fixed="$WORK/fixed.tsv" '
    FILENAME==ARGV[1] { base[$1 SUBSEP $2]=$3; next }
    FILENAME==ARGV[2] { if ($0 !~ /^#/ && NF>=2) known[$1 SUBSEP $2]=$3; next }
    {
        k=$1 SUBSEP $2
        if (base[k]!="pass") next
        if ($3=="pass") { if (k in known) print $1 "\t" $2 > fixed; next }
        if (!(k in known)) print $1 "\t" $2 "\t" $3 "\t" $4 > out
    }' "$BASE" "$KNOWN" "$WORK/diskimg/results.tsv"

{
    printf '| format | qemu ran | qemu pass | diskimg pass |\n|---|---|---|---|\n'
    for fmt in $FORMATS; do
        awk -F'\t' -v f="$fmt" 'FNR==NR { if ($2==f) s[$1]=$3; next }
            $2==f && (s[$1]=="pass" || s[$1]=="fail") { n++; if (s[$1]=="pass") p0++; if ($3=="pass") p++ }
            END { if (n) printf "| %s | %d | %d | %d |\n", f, n, p0, p }' "$BASE" "$WORK/diskimg/results.tsv"
    done
} > "$WORK/table.md"
cat "$WORK/table.md" >&2

if [ -s "$WORK/fixed.tsv" ]; then
    log "known failures that pass now (remove them from scripts/iotests/known-failures.tsv):"
    sed 's/^/    /' "$WORK/fixed.tsv" >&2
fi
if [ $UPDATE = 1 ]; then
    [ $QUICK = 0 ] && [ ${#ARGS[@]} -eq 0 ] || die "--update needs a full run"
    tmp=$WORK/known.new
    grep '^#' "$KNOWN" > "$tmp"
    awk -F'\t' 'FILENAME==ARGV[1] { base[$1 SUBSEP $2]=$3; next }
        FILENAME==ARGV[2] { if ($0 !~ /^#/) why[$1 SUBSEP $2]=$3; next }
        { k=$1 SUBSEP $2; if (base[k]=="pass" && $3!="pass") print $1 "\t" $2 "\t" (k in why ? why[k] : "(unclassified)") }' \
        "$BASE" "$KNOWN" "$WORK/diskimg/results.tsv" >> "$tmp"
    mv "$tmp" "$KNOWN"
    [ $BASELINE = 1 ] && cp "$WORK/qemu/results.tsv" "$DATA/qemu-baseline.tsv"
    log "updated $KNOWN"
fi
nreg=$(wc -l < "$WORK/regressions.tsv")
if [ "$nreg" -gt 0 ]; then
    log "$nreg pairs pass with qemu but fail with diskimg and are not known failures:"
    sed 's/^/    /' "$WORK/regressions.tsv" >&2
fi
awk -F'\t' 'FNR==NR { s[$1 SUBSEP $2]=$3; next }
    { k=$1 SUBSEP $2; if (s[k]=="pass" || s[k]=="fail") { n++; if (s[k]=="pass") p0++; if ($3=="pass") p++ } }
    END { printf "iotests: qemu baseline %d of %d pass; diskimg %d of %d pass\n", p0, n, p, n }' \
    "$BASE" "$WORK/diskimg/results.tsv"
[ "$nreg" -eq 0 ]
