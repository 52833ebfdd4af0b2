#![no_std]
// The programs live in main.rs; this empty library lets the daemon's build.rs depend on the
// package so cargo rebuilds the object when anything here changes.
