"""zo_runtime"""
