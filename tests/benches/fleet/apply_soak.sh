#!/usr/bin/env bash
# 200 applies of a 10-function bundle (PUT /bundle) on one release gateway; RSS sampled.
set -euo pipefail
T=${CARGO_TARGET_DIR:-$(dirname "$0")/../../../target}
BIN=$T/release/edgefn
G=$T/wasm32-wasip2/guest
D=$(mktemp -d)
$BIN keygen --out $D/keys >/dev/null
PORT=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
ADMIN=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
cat > $D/edgefn.toml <<T
[gateway]
id = "soak"
data_dir = "data"
[broker]
kind = "embedded"
listen = "127.0.0.1:$PORT"
[fleet]
trusted_keys = ["keys/edgefn.pub"]
[admin]
listen = "127.0.0.1:$ADMIN"
token = "soak-token-0123456789"
T
$BIN run --config $D/edgefn.toml 2>$D/log & PID=$!
trap "kill $PID; rm -rf $D" EXIT
for i in $(seq 1 100); do curl -s -o /dev/null http://127.0.0.1:$ADMIN/healthz && break; sleep 0.1; done
guests=(threshold enrich cbor_decode moving_average misbehave)
for n in $(seq 1 ${ROUNDS:-200}); do
  : > $D/f.toml
  for i in $(seq 0 9); do
    printf '[[functions]]\nname = "f%s"\ncomponent = "%s/%s.wasm"\ntriggers = ["in/%s"]\npublish = ["out/#"]\nconfig = { round = "%s" }\n\n' $i $G ${guests[$((i%5))]} $i $n >> $D/f.toml
  done
  $BIN bundle --functions $D/f.toml --key $D/keys/edgefn.key --out $D/b.bundle --version $n >/dev/null
  code=$(curl -s -o $D/resp -w '%{http_code}' -X PUT --data-binary @$D/b.bundle -H "Authorization: Bearer soak-token-0123456789" http://127.0.0.1:$ADMIN/bundle)
  [ "$code" = 200 ] || { echo "round $n: $code $(cat $D/resp)"; exit 1; }
  if [ $((n % 25)) = 0 ] || [ $n = 1 ]; then
    echo "after $n applies: RSS $(awk '/VmRSS/{print $2}' /proc/$PID/status) kB, fds $(ls /proc/$PID/fd | wc -l), data_dir $(du -sk $D/data/fleet | cut -f1) kB"
  fi
done
