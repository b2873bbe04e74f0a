#!/bin/sh
# Render users.acl.template into a Redis ACL file: each user's password, read from
# SECRETS_DIR/<role> (gateway, worker, replica, sentinel, admin; first line, e.g. a mounted
# secret), goes in as its SHA-256, so the rendered file holds no password; a role without a
# file stays off. PREFIX is npuserve's key prefix (--prefix, default npuserve:).
# Usage: render-acl.sh SECRETS_DIR OUT_FILE [PREFIX]
#   redis-server --aclfile OUT_FILE
set -eu
secrets=${1:?usage: render-acl.sh SECRETS_DIR OUT_FILE [PREFIX]}
out=${2:?usage: render-acl.sh SECRETS_DIR OUT_FILE [PREFIX]}
prefix=${3:-npuserve:}
here=$(cd "$(dirname "$0")" && pwd)
case $prefix in *[!A-Za-z0-9:._-]*) echo "render-acl.sh: odd prefix '$prefix'" >&2; exit 2;; esac
rules() {
  if [ -s "$secrets/$1" ]; then
    printf 'on #%s' "$(head -n 1 "$secrets/$1" | tr -d '\n' | sha256sum | cut -d' ' -f1)"
  else
    printf 'off'
  fi
}
sed -e "s/@GATEWAY@/$(rules gateway)/" -e "s/@WORKER@/$(rules worker)/" \
    -e "s/@REPLICA@/$(rules replica)/" -e "s/@SENTINEL@/$(rules sentinel)/" \
    -e "s/@ADMIN@/$(rules admin)/" -e "s/@PREFIX@/$prefix/g" \
    "$here/users.acl.template" | grep -v '^#' | grep -v '^$' > "$out.tmp"
mv "$out.tmp" "$out"
chmod 600 "$out"
