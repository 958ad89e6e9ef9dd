#!/bin/bash
# ab.sh TREE: the acceptance command at 1K..4M (factor 4)
uptime; top -bn1 | sed -n 7,10p
cd /tmp && PYTHONPATH=$1 /work/main/.venv/bin/python -m alltoall.cli.bench --nprocs 8 --transports auto --algorithms flat -b 1K -e 4M -f 4 -n 200 -w 10 -R 1 2>&1 | grep -v "^W1\|OMP_NUM\|\*\*\*\*" | grep -v "^#\s*$" | grep "^ *[0-9]"
