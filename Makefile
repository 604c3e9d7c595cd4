# Install flatshard the way NCCL installs: shared library with a soname,
# static library, headers (flatshard_mpi.h included), the flatshard-run
# launcher, pkg-config file and a CMake package.
#   make install PREFIX=/usr/local        (DESTDIR is honoured too)
# Why a Makefile and not cargo-c: no extra tool to install, and the few files
# an install needs are easy to read here.

PREFIX ?= /usr/local
LIBDIR ?= $(PREFIX)/lib
INCDIR ?= $(PREFIX)/include
BINDIR ?= $(PREFIX)/bin
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
MAJOR := $(firstword $(subst ., ,$(VERSION)))
CARGO ?= cargo
TARGET_DIR ?= target
# PROFILE=debug installs the debug build (used by the install test to save a build).
PROFILE ?= release
PROFILE_FLAG := $(if $(filter release,$(PROFILE)),--release,)

.PHONY: all install uninstall
all:
	$(CARGO) build $(PROFILE_FLAG) --lib --bin flatshard-run

install: all
	install -d $(DESTDIR)$(LIBDIR)/pkgconfig $(DESTDIR)$(LIBDIR)/cmake/flatshard $(DESTDIR)$(INCDIR) $(DESTDIR)$(BINDIR)
	install -m 755 $(TARGET_DIR)/$(PROFILE)/flatshard-run $(DESTDIR)$(BINDIR)/flatshard-run
	install -m 755 $(TARGET_DIR)/$(PROFILE)/libflatshard.so $(DESTDIR)$(LIBDIR)/libflatshard.so.$(VERSION)
	ln -sf libflatshard.so.$(VERSION) $(DESTDIR)$(LIBDIR)/libflatshard.so.$(MAJOR)
	ln -sf libflatshard.so.$(MAJOR) $(DESTDIR)$(LIBDIR)/libflatshard.so
	install -m 644 $(TARGET_DIR)/$(PROFILE)/libflatshard.a $(DESTDIR)$(LIBDIR)/libflatshard.a
	install -m 644 include/flatshard.h include/flatshard.hpp include/flatshard_mpi.h $(DESTDIR)$(INCDIR)/
	sed -e 's|@PREFIX@|$(PREFIX)|; s|@LIBDIR@|$(LIBDIR)|; s|@INCDIR@|$(INCDIR)|; s|@VERSION@|$(VERSION)|' \
	    packaging/flatshard.pc.in > $(DESTDIR)$(LIBDIR)/pkgconfig/flatshard.pc
	sed -e 's|@VERSION@|$(VERSION)|' packaging/flatshard-config-version.cmake.in \
	    > $(DESTDIR)$(LIBDIR)/cmake/flatshard/flatshard-config-version.cmake
	install -m 644 packaging/flatshard-config.cmake $(DESTDIR)$(LIBDIR)/cmake/flatshard/

uninstall:
	rm -f $(DESTDIR)$(LIBDIR)/libflatshard.so* $(DESTDIR)$(LIBDIR)/libflatshard.a \
	      $(DESTDIR)$(INCDIR)/flatshard.h $(DESTDIR)$(INCDIR)/flatshard.hpp $(DESTDIR)$(INCDIR)/flatshard_mpi.h \
	      $(DESTDIR)$(BINDIR)/flatshard-run \
	      $(DESTDIR)$(LIBDIR)/pkgconfig/flatshard.pc
	rm -rf $(DESTDIR)$(LIBDIR)/cmake/flatshard
