# find_package(flatshard) -> imported targets flatshard::flatshard (shared)
# and flatshard::flatshard_static.
get_filename_component(_fs_prefix "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)
find_package(Threads REQUIRED)
if(NOT TARGET flatshard::flatshard)
  add_library(flatshard::flatshard SHARED IMPORTED)
  set_target_properties(flatshard::flatshard PROPERTIES
    IMPORTED_LOCATION "${_fs_prefix}/lib/libflatshard.so"
    IMPORTED_SONAME "libflatshard.so.0"
    INTERFACE_INCLUDE_DIRECTORIES "${_fs_prefix}/include")
  add_library(flatshard::flatshard_static STATIC IMPORTED)
  set_target_properties(flatshard::flatshard_static PROPERTIES
    IMPORTED_LOCATION "${_fs_prefix}/lib/libflatshard.a"
    INTERFACE_INCLUDE_DIRECTORIES "${_fs_prefix}/include"
    INTERFACE_LINK_LIBRARIES "Threads::Threads;${CMAKE_DL_LIBS};m")
endif()
set(flatshard_FOUND TRUE)
