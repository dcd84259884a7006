# Sourced by gpu_first.sh and gpu_check.sh before they build: the system gcc/g++ where
# there is one (GPU_FIRST_KEEP_COMPILER=1 keeps CC/CXX as set), since its libstdc++ is the
# one Python loads. On one GPU machine CC/CXX named a wrapper (/opt/gcc/bin/g++) whose build
# printed the integers of error messages as nothing and crashed formatting a double,
# consistent with parts of a libstdc++ linked into the library statically; fastmf refuses
# such a build at import (fastmf/_extension.py _check_formatting).
if [ -z "${GPU_FIRST_KEEP_COMPILER:-}" ] && [ -x /usr/bin/gcc ] && [ -x /usr/bin/g++ ]; then
  export CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
fi
