# Run by ctest: install weir into a scratch prefix, then build and run the consumer twice —
# against the installed package, and with add_subdirectory.
file(REMOVE_RECURSE ${WORK_DIR})
set(prefix ${WORK_DIR}/prefix)

function(run)
  execute_process(COMMAND ${ARGV} RESULT_VARIABLE result)
  if(NOT result EQUAL 0)
    message(FATAL_ERROR "failed (${result}): ${ARGV}")
  endif()
endfunction()

run(${CMAKE_COMMAND} --install ${WEIR_BINARY_DIR} --prefix ${prefix})

foreach(mode installed subdirectory)
  set(build ${WORK_DIR}/${mode})
  if(mode STREQUAL installed)
    set(how -DCMAKE_PREFIX_PATH=${prefix})
  else()
    set(how -DWEIR_SOURCE_DIR=${WEIR_SOURCE_DIR})
  endif()
  run(${CMAKE_COMMAND} -S ${CMAKE_CURRENT_LIST_DIR} -B ${build} -G ${GENERATOR} ${how})
  run(${CMAKE_COMMAND} --build ${build} -j 2)
  run(${build}/consumer)
endforeach()
