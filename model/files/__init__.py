"""Reading and writing the files model code keeps: bounded readers whose errors name the file, in one line."""
