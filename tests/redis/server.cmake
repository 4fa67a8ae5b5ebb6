# Starts or stops a throwaway redis-server on a loopback port, with no persistence:
#   cmake -DACTION=start|stop -DPORT=N -DDIR=scratch -P server.cmake
if(ACTION STREQUAL "start")
  file(MAKE_DIRECTORY ${DIR})
  execute_process(COMMAND redis-server --port ${PORT} --bind 127.0.0.1 --save "" --appendonly no
                    --daemonize yes --dir ${DIR} --pidfile ${DIR}/redis-${PORT}.pid
                  RESULT_VARIABLE started)
  if(NOT started EQUAL 0)
    message(FATAL_ERROR "redis-server did not start")
  endif()
  foreach(attempt RANGE 50)
    execute_process(COMMAND redis-cli -p ${PORT} ping OUTPUT_VARIABLE answer ERROR_QUIET)
    if(answer MATCHES "PONG")
      return()
    endif()
    execute_process(COMMAND ${CMAKE_COMMAND} -E sleep 0.1)
  endforeach()
  message(FATAL_ERROR "redis-server on port ${PORT} does not answer")
else()
  execute_process(COMMAND redis-cli -p ${PORT} shutdown nosave OUTPUT_QUIET ERROR_QUIET)
endif()
