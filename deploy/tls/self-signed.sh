#!/usr/bin/env bash
# Self-signed TLS material for a gateway, for tests and trials (not for production: use your
# organisation's CA there). Writes into OUT_DIR:
#   ca.pem / ca.key          a certificate authority, valid 30 days
#   server.pem / server.key  the gateway's certificate, for HOST (default localhost) and 127.0.0.1
#   client.pem / client.key  a client certificate, for mutual TLS
# Usage: deploy/tls/self-signed.sh OUT_DIR [HOST]
#   npuserve gateway --tls-cert OUT_DIR/server.pem --tls-key OUT_DIR/server.key \
#       [--tls-client-ca OUT_DIR/ca.pem]
#   npuserve client --tls-ca OUT_DIR/ca.pem [--tls-cert OUT_DIR/client.pem \
#       --tls-key OUT_DIR/client.key] --target HOST:50051 "Hello"
set -euo pipefail
out=${1:?usage: self-signed.sh OUT_DIR [HOST]}
host=${2:-localhost}
mkdir -p "$out"
cd "$out"
openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=npuserve test CA" \
  -keyout ca.key -out ca.pem 2>/dev/null
for who in server client; do
  openssl req -newkey rsa:2048 -nodes -subj "/CN=npuserve $who" \
    -keyout "$who.key" -out "$who.csr" 2>/dev/null
  if [ "$who" = server ]; then
    printf 'subjectAltName=DNS:%s,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' \
      "$host" > "$who.ext"
  else
    printf 'extendedKeyUsage=clientAuth\n' > "$who.ext"
  fi
  openssl x509 -req -in "$who.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 30 \
    -extfile "$who.ext" -out "$who.pem" 2>/dev/null
  rm -f "$who.csr" "$who.ext"
done
chmod 600 ./*.key
echo "wrote ca.pem, server.pem/key and client.pem/key to $out"
