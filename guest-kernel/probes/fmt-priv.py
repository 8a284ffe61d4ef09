#!/usr/bin/env python3
"""Formats `pvprobe priv` output as one line per instruction: fault vector, rax, cost."""
import re, sys
out = []; cur = None
for l in sys.stdin:
    m = re.match(r'\s+priv\.(\S+)\s+(\S+)', l)
    if m:
        cur = [m.group(1), '', '', '']; out.append(cur); continue
    if cur is None:
        continue
    m = re.match(r'\s+vector\s+(\S+)', l)
    if m: cur[1] = 'none' if m.group(1) == '0xffffffffffffffff' else m.group(1)
    m = re.match(r'\s+rax\s+(\S+)', l)
    if m: cur[2] = m.group(1)
    m = re.match(r'\s+each.cyc\s+\d+ cycles = (\S+) us', l)
    if m: cur[3] = m.group(1) + ' us'
for c in out:
    print('%-28s fault=%-6s rax=%-20s %s' % tuple(c))
