// weir::pipeline, for now in detail/driver.hpp with its driver (split in the next commit).
#pragma once

#include <weir/detail/driver.hpp>
